"""Does the transfer monitor track transfer? Spearman rank correlations over a λ sweep.

After ``python recipes/<recipe>.py sweep --param lam --set bissl.monitor_every=K`` every sweep
value's ``<value>/<target>/bissl_history.json`` holds the monitor (thesis Sec. 9.1, last item).
For each unsupervised measure (``rankme``, ``alignment``, ``uniformity``, ``gaussian_mi``) this
computes Spearman's ρ (``scipy.stats.spearmanr``) with

- ``knn (final)``: the k-NN probe accuracy, one point per sweep value (the last monitored
  alternation: the θ_P that BiSSL+FT starts from);
- ``knn (all)``: the k-NN probe, pooling every monitored alternation of every sweep value;
- ``BiSSL+FT test``: the final measure against the BiSSL+FT test metric of that value.

    python -m recipes.common.monitor_correlation runs/vision --param lam [--target digits]

Alignment and uniformity are "lower is better", so a useful alignment/uniformity has ρ < 0.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .report import MONITOR_CURVES as MEASURES
from .report import write_json

__all__ = ["MEASURES", "format_correlations", "main", "monitor_correlations", "spearman"]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of finite pairs (``nan`` with fewer than 3 or a constant)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def monitor_correlations(out_dir: str | Path, param: str = "lam",
                         target: str | None = None) -> dict[str, Any]:
    """The correlations for the sweep in ``out_dir/sweep_<param>/`` (see the module docstring);
    ``target`` defaults to the only one present."""
    root = Path(out_dir) / f"sweep_{param}"
    values = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: float(p.name))
    if not values:
        raise FileNotFoundError(f"{root}: no sweep values; run `sweep --param {param}` first")
    if target is None:
        found = sorted({h.parent.name for v in values for h in v.glob("*/bissl_history.json")})
        if len(found) != 1:
            raise ValueError(f"pass --target, one of {found}")
        target = found[0]
    final: dict[str, list[float]] = {m: [] for m in (*MEASURES, "knn_accuracy", "test")}
    pooled: dict[str, list[float]] = {m: [] for m in (*MEASURES, "knn_accuracy")}
    for v in values:
        history = json.loads((v / target / "bissl_history.json").read_text())
        rows = [h for h in history if "rankme" in h]
        if not rows:
            raise ValueError(f"{v / target}: no monitor records (set bissl.monitor_every)")
        for m in pooled:
            pooled[m] += [r.get(m) for r in rows]
            final[m].append(rows[-1].get(m))
        ft = v / target / "bissl_ft.json"
        test = math.nan
        if ft.exists():
            summary = json.loads(ft.read_text())["summary"]
            test = next(s["mean"] for k, s in summary.items() if k.startswith("test_"))
        final["test"].append(test)
    table = {m: {"knn (final)": spearman(final[m], final["knn_accuracy"]),
                 "knn (all)": spearman(pooled[m], pooled["knn_accuracy"]),
                 "BiSSL+FT test": spearman(final[m], final["test"])} for m in MEASURES}
    return {"param": param, "target": target, "values": [v.name for v in values],
            "final": final, "spearman": table}


def format_correlations(result: dict[str, Any]) -> str:
    """A plain table: one row per measure, one column per reference."""
    cols = ["knn (final)", "knn (all)", "BiSSL+FT test"]
    lines = [f"{'measure':<12}" + "".join(f"{c:>15}" for c in cols)]
    for m, row in result["spearman"].items():
        lines.append(f"{m:<12}" + "".join(f"{row[c]:>15.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: print the table, write ``monitor_correlation_<param>.json``."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the run.out_dir the sweep ran in")
    p.add_argument("--param", default="lam", help="the swept parameter (sweep --param)")
    p.add_argument("--target", default=None, help="the downstream target (default: the only one)")
    args = p.parse_args(argv)
    result = monitor_correlations(args.out_dir, args.param, args.target)
    print(f"Spearman ρ over {args.param} = {', '.join(result['values'])} ({result['target']}):")
    print(format_correlations(result))
    write_json(result, Path(args.out_dir) / f"monitor_correlation_{args.param}.json")
    return result


if __name__ == "__main__":
    main()

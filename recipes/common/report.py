"""The report of a run: ``results.json`` (one schema for both recipes), the tables and the plots.

``results.json``::

    {"recipe": "vision" | "gpt-glue", "config": {...}, "world_size": 1, "wall_seconds": 412.0,
     "pretext_losses": [...],
     "targets": {"<target>": {"metric": "top1",
                              "only_ft": <method>, "bissl_ft": <method>,   # see common.search
                              "bissl_history": [{"alternation", "lam", "lower_loss", ...}],
                              "avg_diff_points": 1.2,
                              "comparison": {"<column>": {"diff", "ci", "p_value", ...}}}},
     "summary": {"Only-FT": {"<column>": {"mean", "std", "n"}}, "BiSSL+FT": {...}},
     "epochs": {"Only-FT": {"<target>": {"mean", "std", "n"}}, "BiSSL+FT": {...}},
     "comparisons": {"<column>": {...}},   # paired over seeds, see common.stats; null: unpaired
     "table": "...",
     "inputs": {"<file>": {"stage", "record", "sha256": {...}}},   # the stage files read
     "allowed_changes": [...]}   # settings that differ from the files' records (allowed)

Every JSON and JSON Lines file the recipes write (``results.json``, the stages' outputs and run
records, ``sweep_*.json``, ``study.json``, the trainer's ``metrics.jsonl``) is strict JSON: a
non-finite float (NaN, ±inf) is written as ``null`` and the text is made with
``json.dumps(..., allow_nan=False)`` (:mod:`recipes.common.jsonio`).

The report reads the stage files only through their run records (:mod:`recipes.common.records`):
a file changed after its record, or made under settings other than ``config``, stops it unless
``--allow-changed-config`` (then listed in ``allowed_changes``); ``config`` is the configuration
every file was made with.

``epochs`` are the fine-tuning epochs the retrains trained (fewer than ``finetune.epochs`` under
early stopping, ``finetune.patience``); the table prints them beside the test scores.

Columns are the targets (``<target> <metric>`` where a target reports several test metrics).
Plots in ``plots/``: ``<target>.png`` (BiSSL+FT vs Only-FT), ``<target>_bissl.png`` (the BiSSL
curves), ``<target>_monitor.png`` (the transfer monitor, with ``bissl.monitor_every``) and
``pretext_loss.png``.

The parts: :func:`aggregate` (mean ± std over runs), :func:`format_table` and
:func:`format_comparisons` (plain-text tables), :func:`write_json` (atomic) and the PNG plots
(:func:`plot_bars`, :func:`plot_curves`, :func:`plot_monitor`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from implicitbilevel.bissl.checkpoint import load_checkpoint

from .config import config_to_dict
from .jsonio import write_json
from .records import Checked, Input, check_inputs
from .stats import compare_methods

__all__ = ["METHODS", "aggregate", "epochs_table", "format_comparisons", "format_table",
           "plot_bars", "plot_curves", "plot_monitor", "report", "table_with_diff",
           "verify_stage_files", "write_json"]


def aggregate(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over runs: ``{"mean", "std", "n"}``; std is the sample std (0 for one run).

    Only metrics present in every run are aggregated.
    """
    if not runs:
        raise ValueError("no runs to aggregate")
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    out = {}
    for key in keys:
        values = [float(r[key]) for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def format_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str],
    *,
    scale: float = 1.0,
    digits: int = 2,
) -> str:
    """A plain-text table: one row per method of ``summary`` (method -> metric -> aggregate),
    one ``mean ± std`` column per metric, values multiplied by ``scale`` (100 for percent)."""
    header = ["method", *metrics]
    rows = [header]
    for method, stats in summary.items():
        row = [method]
        for metric in metrics:
            s = stats.get(metric)
            if s is None:
                row.append("-")
            else:
                row.append(f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_comparisons(
    comparisons: Mapping[str, Any], *, scale: float = 100.0, alpha: float = 0.05
) -> str:
    """One line per column: the paired comparison of BiSSL+FT against Only-FT over the same
    seeds (a :class:`~recipes.common.stats.PairedComparison`, or ``None`` when the methods were
    not run over the same seeds): the mean difference with its 95% t-interval (×``scale``), the
    paired t-test's p-value, the std ratio, and whether the difference is significant at
    ``alpha`` (the thesis's bold, Tables 6.1 and 7.1)."""
    lines = [f"BiSSL+FT - Only-FT, paired over seeds (significant: paired t-test p < {alpha:g}):"]
    for column, c in comparisons.items():
        if c is None:
            lines.append(f"  {column}: not run over the same seeds, no paired test")
        elif c.n < 2:
            lines.append(f"  {column}: {scale * c.diff:+.2f}, {c.note}")
        else:
            verdict = "SIGNIFICANT" if c.significant else "not significant"
            lines.append(f"  {column}: {scale * c.diff:+.2f} [{scale * c.ci[0]:+.2f}, "
                         f"{scale * c.ci[1]:+.2f}], p = {c.p_value:.3g}, std ratio "
                         f"{c.std_ratio:.2f}, n = {c.n}: {verdict}")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str,
    path: str | Path,
    *,
    title: str = "",
    scale: float = 1.0,
) -> Path:
    """Bar chart of ``metric`` per method with ± std error bars, written as PNG."""
    plt = _pyplot()
    methods = [m for m in summary if metric in summary[m]]
    means = [summary[m][metric]["mean"] * scale for m in methods]
    stds = [summary[m][metric]["std"] * scale for m in methods]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(methods), 3.6))
    ax.bar(methods, means, yerr=stds, capsize=6, color=[f"C{i}" for i in range(len(methods))])
    if means:
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        pad = max(hi - lo, 1e-6) * 0.5
        ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_curves(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str = "step",
    title: str = "",
    logy: Sequence[str] = (),
) -> Path:
    """One subplot per named series (e.g. losses and λ over alternations), written as PNG.
    Series named in ``logy`` get a log y-axis."""
    plt = _pyplot()
    names = [n for n in series if len(series[n]) > 0]
    if not names:
        raise ValueError("no non-empty series to plot")
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), sharex=True)
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names, strict=True):
        ax.plot(range(len(series[name])), list(series[name]))
        ax.set_ylabel(name)
        if name in logy and min(series[name]) > 0:
            ax.set_yscale("log")
    axes[-1].set_xlabel(xlabel)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


MONITOR_CURVES = ("rankme", "alignment", "uniformity", "gaussian_mi")


def plot_monitor(history: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                 ) -> Path | None:
    """The transfer monitor against alternations (thesis Sec. 9.1): one panel per unsupervised
    measure, each beside the k-NN probe accuracy on a second axis. ``None`` (nothing drawn) when
    no record of ``history`` (the BiSSL metrics) holds the monitor."""
    rows = [h for h in history if "rankme" in h]
    if not rows:
        return None
    plt = _pyplot()
    t = [h["alternation"] for h in rows]
    knn = [h.get("knn_accuracy") for h in rows]
    fig, axes = plt.subplots(len(MONITOR_CURVES), 1, figsize=(6, 2.2 * len(MONITOR_CURVES)),
                             sharex=True)
    for ax, name in zip(axes, MONITOR_CURVES, strict=True):
        ax.plot(t, [h[name] for h in rows], marker="o", color="C0")
        ax.set_ylabel(name, color="C0")
        if any(k is not None for k in knn):
            twin = ax.twinx()
            twin.plot(t, knn, marker="s", linestyle="--", color="C1")
            twin.set_ylabel("k-NN acc.", color="C1")
    axes[-1].set_xlabel("alternation")
    axes[0].set_title(title or "transfer monitor (θ_P) and k-NN probe")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METHODS = {"Only-FT": "only_ft.json", "BiSSL+FT": "bissl_ft.json"}
CURVES = ("lower_loss", "upper_loss", "lam", "regularizer", "ij_relative_residual",
          "upper_grad_norm")


def table_with_diff(summary: dict[str, dict[str, Any]], columns: list[str],
                    significant: dict[str, bool] | None = None) -> str:
    """``format_table`` of the methods (×100) plus the thesis's "Avg Diff" row (BiSSL+FT minus
    Only-FT, in points; ``*`` where ``significant`` marks the column)."""
    table = format_table(summary, columns, scale=100.0)
    only, bissl = summary.get("Only-FT", {}), summary.get("BiSSL+FT", {})
    marks = significant or {}
    diffs = [f"{100 * (bissl[c]['mean'] - only[c]['mean']):+.2f}{'*' if marks.get(c) else ''}"
             if c in only and c in bissl else "-" for c in columns]
    widths = [len(cell) for cell in table.splitlines()[1].split("  ")]
    cells = ["avg diff", *diffs]
    return table + "\n" + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def epochs_table(epochs: dict[str, dict[str, Any]], targets: list[str]) -> str:
    """The fine-tuning epochs used, ``mean ± std`` over the retrains, per method and target."""
    return format_table(epochs, [f"{t} epochs" for t in targets], scale=1.0, digits=1)


def verify_stage_files(recipe: Any, allow_changed_config: bool = False) -> Checked:
    """Verify the records of the files the report reads (see the module docstring)."""
    out = recipe.out
    files = [Input(out / "pretext.pt", "pretext")]
    for target in recipe.targets:
        files += [Input(recipe.path(target, "only_ft.json"), "only-ft"),
                  Input(recipe.path(target, "bissl_ft.json"), "finetune"),
                  Input(recipe.path(target, "bissl_history.json"), "bissl")]
    return check_inputs(out, files, "report", lambda _: recipe.cfg, allow_changed_config,
                        "results.json")


def report(recipe: Any, wall_seconds: float | None = None,
           allow_changed_config: bool = False) -> dict[str, Any]:
    """Collect every target's stage files into ``results.json``, print the table, draw plots."""
    checked = verify_stage_files(recipe, allow_changed_config)
    out, targets, summary = recipe.out, {}, {m: {} for m in METHODS}
    epochs: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    columns: list[str] = []
    comparisons: dict[str, Any] = {}
    for target in recipe.targets:
        metrics = recipe.report_metrics(target)
        entry: dict[str, Any] = {"metric": metrics[0]}
        for method, name in METHODS.items():
            result = recipe.read_json(target, name)
            entry["bissl_ft" if method == "BiSSL+FT" else "only_ft"] = result
            if "epochs" in result["summary"]:
                epochs[method][f"{target} epochs"] = result["summary"]["epochs"]
            for metric in metrics:
                column = target if len(metrics) == 1 else f"{target} {metric}"
                summary[method][column] = result["summary"][f"test_{metric}"]
                columns += [] if column in columns else [column]
        for metric in metrics:  # Only-FT and BiSSL+FT over the same seeds: a paired test
            column = target if len(metrics) == 1 else f"{target} {metric}"
            comparisons[column] = compare_methods(entry["only_ft"], entry["bissl_ft"],
                                                  f"test_{metric}", wilcoxon=True)
        entry["comparison"] = {c: None if comparisons[c] is None else comparisons[c].to_dict()
                               for c in columns[-len(metrics):]}
        history = recipe.read_json(target, "bissl_history.json")
        head = f"test_{metrics[0]}"
        entry["bissl_history"] = history
        entry["avg_diff_points"] = 100 * (entry["bissl_ft"]["summary"][head]["mean"]
                                          - entry["only_ft"]["summary"][head]["mean"])
        targets[target] = entry
        plot_bars({m: {target: summary[m][columns[-len(metrics)]]} for m in METHODS}, target,
                  out / "plots" / f"{target}.png", title=f"{target} ({metrics[0]}, test)",
                  scale=100)
        series = {k: [h[k] for h in history] for k in CURVES if k in history[0]}
        plot_curves(series, out / "plots" / f"{target}_bissl.png", xlabel="alternation",
                    title=f"BiSSL on {target}",
                    logy=("lam", "regularizer", "ij_relative_residual"))
        plot_monitor(history, out / "plots" / f"{target}_monitor.png",
                     title=f"transfer monitor on {target}")
    losses = load_checkpoint(out / "pretext.pt").get("losses", [])
    if losses:
        plot_curves({"pretext loss": losses}, out / "plots" / "pretext_loss.png", xlabel="step")
    table = table_with_diff(summary, columns,
                            {c: bool(v and v.significant) for c, v in comparisons.items()})
    table += "\n\n" + format_comparisons(comparisons)
    if any(epochs.values()):
        table += "\n\nFine-tuning epochs used (mean ± std):\n" + epochs_table(epochs,
                                                                            recipe.targets)
    seeds = len(recipe.cfg.finetune.seeds)
    print(f"\nTest scores ×100 (mean ± std over {seeds} seeds):\n{table}\n", flush=True)
    results = {
        "recipe": recipe.name,
        "config": config_to_dict(recipe.cfg),
        "world_size": recipe.dist.world_size,
        "wall_seconds": wall_seconds,
        "pretext_losses": losses,
        "targets": targets,
        "summary": summary,
        "epochs": epochs,
        "comparisons": {c: None if v is None else v.to_dict() for c, v in comparisons.items()},
        "table": table,
        "inputs": checked.entries,
        "allowed_changes": checked.changes,
    }
    write_json(results, out / "results.json")
    print(f"wrote {out / 'results.json'} and plots in {out / 'plots'}", flush=True)
    return results

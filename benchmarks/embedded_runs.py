"""The embedded defaults' runs as the README states them: wall time, the IJ residuals, the result.

    python benchmarks/embedded_runs.py vision [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/embedded_runs.py gpt    [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/embedded_runs.py vision --key vision-mfac --set bissl.ij=mfac

Runs ``python recipes/vision_bissl.py`` (or ``recipes/gpt_glue_bissl.py``) on its embedded default
from an empty run folder, as the README's first command does after the install, and records in
``benchmarks/results/embedded-cpu.json``: the wall and CPU minutes of the whole pipeline and the
machine's load average at start and end (a wall time measured beside other jobs is an upper
bound; the file says so); the implicit-Jacobian setting; every alternation's relative residual
``‖v − A u‖/‖v‖`` of the last upper step's solve, read from each target's
``bissl/metrics.jsonl`` (median, maximum, the count at or below 0.1, by
``benchmarks.recycled_recipe_ij.summarise``) and the solver breakdowns over all solves; and
the BiSSL+FT vs Only-FT comparison per target and metric from ``results.json`` (means and
standard deviations over the seeds, the paired p-value). ``docs/facts.py`` reads this
file, and ``tests/test_readme.py`` checks that README.md states what it holds. A run with
``--set`` options is stored under ``--key`` (default: the recipe's name, the embedded default);
"Beyond the thesis" reads the variants stored so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

from benchmarks.recycled_recipe_ij import TARGET, summarise  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "embedded-cpu.json"
SCRIPTS = {"vision": "recipes/vision_bissl.py", "gpt": "recipes/gpt_glue_bissl.py"}


def summarize(run_dir: Path) -> dict[str, Any]:
    """What a finished run folder says: its IJ setting, residuals and the method comparison."""
    results = json.loads((run_dir / "results.json").read_text())
    bissl = results["config"]["bissl"]
    targets, pooled, breakdowns = {}, [], 0
    upper_steps = int(bissl["upper_steps"])
    for name in results["targets"]:
        run = summarise(name, bissl["ij"], str(run_dir / name / "bissl" / "metrics.jsonl"),
                        upper_steps)
        targets[name] = {"alternations": run["alternations"], "median": run["residual_median"],
                         "max": run["residual_max"], "at_most_0_1": run["met"],
                         "breakdowns": run["breakdowns"],
                         "solves": run["alternations"] * upper_steps}
        pooled += run["residuals"]
        breakdowns += run["breakdowns"]
    # every alternation of every target together (the README's row for a multi-task run)
    all_targets = {"alternations": len(pooled), "median": statistics.median(pooled),
                   "max": max(pooled), "at_most_0_1": sum(r <= TARGET for r in pooled),
                   "breakdowns": breakdowns, "solves": len(pooled) * upper_steps}
    comparisons = {
        key: {k: c[k] for k in ("n", "mean_a", "std_a", "mean_b", "std_b", "diff", "p_value",
                                "significant")}
        for key, c in results["comparisons"].items()
    }
    return {"ij": bissl["ij"], "curvature": bissl["curvature"], "cg_iters": bissl["cg_iters"],
            "targets": targets, "all_targets": all_targets, "comparisons": comparisons,
            "pipeline_wall_seconds": results.get("wall_seconds")}


def _machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def run(recipe: str, out: Path, sets: list[str]) -> dict[str, Any]:
    """Run one embedded default into ``out`` (which must not hold a run) and measure it."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the measurement starts from an empty run folder")
    argv = [sys.executable, SCRIPTS[recipe], "--set", f"run.out_dir={out}"]
    argv += [a for s in sets for a in ("--set", s)]
    start_machine, start = _machine(), time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, cwd=ROOT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": f"python {SCRIPTS[recipe]}" + "".join(f" --set {s}" for s in sets),
            "wall_minutes": round(wall / 60, 1), "cpu_minutes": round(cpu / 60, 1),
            "machine_start": start_machine, "machine_end": _machine(),
            "note": "wall time on the machine as it was (load averages at start and end): on a "
                    "busier machine it is an upper bound", **summarize(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", choices=sorted(SCRIPTS))
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--key", default=None,
                    help="where the file stores the run (default: the recipe's name)")
    args = ap.parse_args(argv)
    key = args.key or args.recipe
    if key in SCRIPTS and (args.sets or key != args.recipe):  # an embedded default's own entry
        raise SystemExit(f"--key {key!r} is the {key} embedded default's own entry: store a run "
                         "with --set options, or of another recipe, under a --key of its own")
    with tempfile.TemporaryDirectory() as tmp:
        measured = run(args.recipe, args.out or Path(tmp) / "run", args.sets)
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored[key] = measured
    RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
    print(json.dumps(measured, indent=1))
    return measured


if __name__ == "__main__":
    main()

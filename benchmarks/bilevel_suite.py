"""The bilevel suite: every stochastic method and the implicit baselines on every problem of
benchopt's bilevel benchmark, against wall time and oracle calls.

Usage::

    python benchmarks/bilevel_suite.py --quick                        # a few minutes, all problems
    python benchmarks/bilevel_suite.py --full --problems quadratic --family stochastic
    python benchmarks/bilevel_suite.py --merge      # one table of every full per-problem run

Problems: :mod:`benchmarks.bilevel_problems` (the quadratic, the two logistic regressions, the
multinomial one and data hyper-cleaning at 50/70/90 % corruption); methods:
:mod:`benchmarks.bilevel_methods`, and the external ``jaxopt-implicit`` (JAXopt's implicit
hypergradient, the baseline benchopt runs; :mod:`benchmarks.bilevel_jaxopt`), run only where
``jax`` and ``jaxopt`` are installed and on the problems ported to JAX (the quadratic and the two
binary logistic regressions), left out with the reason otherwise.

Protocol. Each method is tuned on sampler seed 0 over a small grid of its step size ``s`` and outer
ratio ``r`` (inner step ``s``, outer step ``s / r``; per problem, :data:`GRIDS`: 6 to 8
configurations in full mode, 1 s per tuning run and 5 s per measured run; 2 in quick mode, 0.25 s
and 0.4 s), the criterion being the validation loss ``h(x)`` at the end of the tuning run (a
diverged run scores ``+∞``). The chosen configuration then runs on seeds 1-5 for a fixed time
budget, the metrics (:meth:`BenchProblem.metrics`, against the converged reference) taken at
log-spaced times outside the timed steps. Time is the process's CPU time over the method's steps
(one intra-op thread), which on a shared, loaded machine stands in for the wall time of an idle
core; the wall time is recorded beside it. Curves are the median over seeds with a 20-80 % band,
against seconds and against oracle calls in full-batch equivalents; the table gives the final
medians and the time and calls to reach ``‖∇h‖² ≤ 1e-4 ‖∇h(x_0)‖²`` (the median over seeds, ``-``
when most seeds never do; for the softmax problems the table is ordered by the time to a test error
within one point of the best final one, benchopt's metric there). A run whose ``‖y − y*‖²`` grows
past 1e4 times its start counts as diverged: it is stopped, scores ``+∞`` in tuning and never
reaches a target (hyper-cleaning has a flat ``h`` where every weight saturates, which such a
run finds).
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.bilevel_jaxopt import EXTERNAL, PORTED, unavailable
from benchmarks.bilevel_methods import METHODS, MethodSpec, make_runner
from benchmarks.bilevel_problems import BenchProblem
from benchmarks.bilevel_registry import PROBLEMS, build
from benchmarks.harness import (
    add_out,
    add_threads,
    command_line,
    finish,
    fmt,
    header,
    new_results,
    parser,
    pyplot,
    row,
    save_figure,
    set_threads,
    table_head,
    write_results,
)

__all__ = ["FULL", "QUICK", "Settings", "main", "run_method", "run_one"]

METRICS = ("value", "grad_norm2", "inner_distance", "test_error")
TARGET = 1e-4
BLOWUP = 1e4
_START: dict[int, dict[str, Any]] = {}


GRIDS = {
    "quadratic": ((0.01, 0.1), (0.1, 1.0, 10.0, 100.0)),
    "ijcnn1": ((0.1, 0.25), (0.03, 0.1, 1.0)),
    "breast_cancer": ((0.1, 0.25), (0.03, 0.1, 1.0)),
    "digits_multilogreg": ((0.01, 0.1), (0.01, 0.1, 1.0)),
    "cleaning": ((0.01, 0.1), (1e-5, 1e-4, 1e-3)),
}
"""Per problem family, the step sizes ``s`` and outer ratios ``r`` of the full grid (the
quadratic's is benchopt's ``quadratics_021424`` grid; the others are centred on the best
parameters benchopt's configs record for ijcnn1 and MNIST hyper-cleaning, whose per-sample
weights want outer steps of order ``n``). Quick mode: the largest ``s`` and the two middle
``r``."""


def grid(problem: str, mode: str) -> list[tuple[float, float]]:
    """The ``(s, r)`` configurations tuned over for ``problem`` in ``mode``."""
    steps, ratios = GRIDS["cleaning" if problem.startswith("cleaning") else problem]
    if mode == "quick":
        steps, ratios = steps[-1:], ratios[(len(ratios) - 1) // 2:][:2]
    return [(s, r) for s in steps for r in ratios]


@dataclass(frozen=True)
class Settings:
    """One mode of the suite."""

    mode: str
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    tune_seed: int = 0
    budget: float = 0.4
    tune_budget: float = 0.25
    evals: int = 8


QUICK = Settings("quick")
FULL = Settings("full", budget=5.0, tune_budget=1.0, evals=14)


def run_one(spec: MethodSpec, problem: BenchProblem, step: float, ratio: float, seed: int,
            budget: float, evals: int) -> dict[str, Any]:
    """One run for ``budget`` seconds of the method's own CPU time, the metrics at ``evals``
    log-spaced times (not timed) and at the start."""
    runner = make_runner(spec, problem, step, ratio, seed)
    marks = [budget * 10 ** (-2 + 2 * k / max(evals - 1, 1)) for k in range(evals)]
    if id(problem) not in _START:  # the same start for every run of a problem
        _START[id(problem)] = problem.metrics(runner.x, runner.y)
    first = dict(_START[id(problem)])
    warm = first.pop("y_star")
    curve = [{"time": 0.0, "wall": 0.0, "calls": 0.0, **first}]
    elapsed, wall, steps, k, diverged = 0.0, 0.0, 0, 0, False
    while elapsed < budget:
        start, start_wall = time.process_time(), time.perf_counter()
        runner.step()
        elapsed += time.process_time() - start
        wall += time.perf_counter() - start_wall
        steps += 1
        finite = all(bool(torch.isfinite(t).all()) for t in (*runner.x.values(),
                                                             *runner.y.values()))
        if not finite:
            diverged = True
            break
        if elapsed >= marks[k] or elapsed >= budget:
            while k < len(marks) - 1 and marks[k] <= elapsed:
                k += 1
            point = problem.metrics(runner.x, runner.y, warm)
            warm = point.pop("y_star")
            curve.append({"time": elapsed, "wall": wall, "calls": runner.equivalents(), **point})
            if point["inner_distance"] > BLOWUP * max(1.0, first["inner_distance"]):
                diverged = True  # y ran away: a flat ∇h there (saturated weights) is no success
                break
    return {"curve": curve, "steps": steps, "diverged": diverged}


def _score(run: dict[str, Any]) -> float:
    value = run["curve"][-1]["value"]
    return math.inf if run["diverged"] or not math.isfinite(value) else value


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _reach(curve: list[dict[str, Any]], target: float) -> tuple[float, float]:
    for point in curve:
        if point["grad_norm2"] <= target:
            return point["time"], point["calls"]
    return math.inf, math.inf


def run_method(spec: MethodSpec, problem: BenchProblem, settings: Settings) -> dict[str, Any]:
    """Tune on the tuning seed, then run the chosen configuration on every seed."""
    configs = []
    for step, ratio in grid(problem.name, settings.mode):
        run = run_one(spec, problem, step, ratio, settings.tune_seed, settings.tune_budget, 3)
        configs.append({"step": step, "ratio": ratio, "score": _score(run)})
    best = min(configs, key=lambda c: c["score"])
    runs = [run_one(spec, problem, best["step"], best["ratio"], seed, settings.budget,
                    settings.evals) for seed in settings.seeds]
    target = TARGET * runs[0]["curve"][0]["grad_norm2"]
    reach = [(math.inf, math.inf) if r["diverged"] else _reach(r["curve"], target) for r in runs]
    finals = {m: _median([r["curve"][-1][m] for r in runs]) for m in METRICS}
    times = sorted(t for t, _ in reach)
    calls = sorted(c for _, c in reach)
    for config in configs:  # strict JSON: no infinities
        config["score"] = None if math.isinf(config["score"]) else config["score"]
    return {"method": spec.name, "family": spec.family, "grid": configs,
            "step": best["step"], "ratio": best["ratio"], "final": finals,
            "time_to_target": _finite(times[len(times) // 2]),
            "calls_to_target": _finite(calls[len(calls) // 2]),
            "target": target, "steps": _median([r["steps"] for r in runs]),
            "diverged": sum(r["diverged"] for r in runs), "runs": runs}


# -- report --------------------------------------------------------------------------------------


def _bands(runs: list[dict[str, Any]], axis: str, metric: str, grid: torch.Tensor
           ) -> tuple[list[float], list[float], list[float]]:
    """Median and 20/80 % quantiles over seeds of the last value at or before each grid point."""
    table = []
    for run in runs:
        points = [(p[axis], p[metric]) for p in run["curve"] if p[metric] is not None]
        table.append([next((v for a, v in reversed(points) if a <= g), math.nan)
                      for g in grid.tolist()])
    data = torch.tensor(table, dtype=torch.float64)
    q = torch.nanquantile(data, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), dim=0)
    return q[1].tolist(), q[0].tolist(), q[2].tolist()


def plot(problem: dict[str, Any], path: str) -> None:
    """Every metric against time and oracle calls: median and 20-80 % band per method."""
    plt = pyplot()
    metrics = [m for m in METRICS if problem["methods"][0]["final"][m] is not None]
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 7), squeeze=False)
    for res in problem["methods"]:
        for i, axis in enumerate(("time", "calls")):
            top = max(r["curve"][-1][axis] for r in res["runs"])
            if top <= 0:
                continue
            grid = torch.logspace(math.log10(top) - 2.5, math.log10(top), 40, dtype=torch.float64)
            for j, metric in enumerate(metrics):
                med, lo, hi = _bands(res["runs"], axis, metric, grid)
                ax = axes[i][j]
                style = {"stochastic": "-", "implicit": "--"}.get(res["family"], ":")
                line, = ax.plot(grid.tolist(), med, style, label=res["method"])
                ax.fill_between(grid.tolist(), lo, hi, alpha=0.15, color=line.get_color())
                ax.set_xscale("log")
                if metric in ("grad_norm2", "inner_distance"):
                    ax.set_yscale("log")
                ax.set_xlabel("CPU seconds" if axis == "time" else "oracle calls (full batches)")
                ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(problem["title"], fontsize=9)
    save_figure(fig, path, dpi=80, rect=(0, 0, 1, 0.96))


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else fmt(float(value))


def _error_reach(problem: dict[str, Any]) -> tuple[float | None, dict[str, float | None]]:
    """Per method, the median time to a test error within one point of the best final one."""
    finals = [m["final"]["test_error"] for m in problem["methods"]]
    if any(f is None for f in finals):
        return None, {}
    target = min(finals) + 0.01
    out = {}
    for m in problem["methods"]:
        times = sorted(math.inf if r["diverged"] else next(
            (p["time"] for p in r["curve"] if p["test_error"] <= target), math.inf)
            for r in m["runs"])
        out[m["method"]] = _finite(times[len(times) // 2])
    return target, out


def _order(m: dict[str, Any], by_error: bool, err_times: dict[str, float | None]
           ) -> tuple[float, float]:
    """The sort key of a method's row: time to the problem's target, then the final value."""
    t = err_times.get(m["method"]) if by_error else m["time_to_target"]
    last = m["final"]["test_error" if by_error else "grad_norm2"]
    return (math.inf if t is None else t, math.inf if last is None else last)


def render(results: dict[str, Any]) -> str:
    """The Markdown report: one table per problem, methods by time to target."""
    lines = header(f"# Bilevel suite ({results['mode']})", results)
    lines += ["", __doc__.split("Protocol.")[1].strip().replace("\n", " "), ""]
    for name, problem in results["problems"].items():
        lines += [f"## {name}", "", problem["title"], "",
                  f"Target: ‖∇h‖² ≤ {TARGET:g} ‖∇h(x_0)‖² = {_cell(problem['target'])}.", ""]
        err_target, err_times = _error_reach(problem)
        if err_target is not None:
            lines += [f"Test-error target: the best final median + 0.01 = {err_target:.3f}.", ""]
        lines += table_head("method", "s / r", "h(x)", "‖∇h‖²", "‖y − y*‖²", "test error",
                            "CPU s to target", "calls to target", "CPU s to test-error target",
                            "steps", "diverged")
        by_error = err_target is not None and name != "ijcnn1" and name != "breast_cancer"
        if by_error:
            lines += ["Ordered by the time to the test-error target (benchopt's metric for this "
                      "problem), then the final test error.", ""]

        ordered = sorted(problem["methods"], key=lambda m: _order(m, by_error, err_times))
        for m in ordered:
            f = m["final"]
            lines.append(row(m["method"], f"{m['step']:g} / {m['ratio']:g}", _cell(f["value"]),
                             _cell(f["grad_norm2"]), _cell(f["inner_distance"]),
                             _cell(f["test_error"]), _cell(m["time_to_target"]),
                             _cell(m["calls_to_target"]), _cell(err_times.get(m["method"])),
                             _cell(m["steps"]), f"{m['diverged']}/5"))
        absent = [s.name for s in EXTERNAL if s.name not in {m["method"] for m in
                                                           problem["methods"]}]
        for method in absent:
            reason = problem.get("skipped", {}).get(method) or (
                f"ported for {', '.join(PORTED)} only" if name not in PORTED else "not run")
            lines += ["", f"Not in this table: {method} ({reason})."]
        lines += ["", f"![{name}]({os.path.basename(problem['plot'])})", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small budgets (default)")
    mode.add_argument("--full", action="store_true", help="benchopt's grid, longer budgets")
    mode.add_argument("--merge", action="store_true", help="merge the full per-problem runs")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--methods", nargs="+", default=[m.name for m in METHODS + EXTERNAL])
    p.add_argument("--family", choices=("stochastic", "implicit", "external"), default=None,
                   help="only the methods of one family")
    p.add_argument("--budget", type=float, default=None, help="seconds per measured run")
    add_out(p)
    add_threads(p, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.out)
    settings = FULL if args.full else QUICK
    if args.budget:
        settings = replace(settings, budget=args.budget)
    set_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    results = new_results(command_line("bilevel_suite.py", argv), "cpu", settings,
                          mode=settings.mode)
    results["problems"] = {}
    specs = [m for m in METHODS + EXTERNAL if m.name in args.methods
             and (args.family is None or m.family == args.family)]
    suffix = "" if set(args.problems) == set(PROBLEMS) else "-" + "-".join(args.problems)
    suffix += f"-{args.family}" if args.family else ""
    stem = f"bilevel_suite-{settings.mode}{suffix}"
    for name in args.problems:
        problem = build(name)
        skipped = {s.name: unavailable(name) for s in specs if s.family == "external"}
        skipped = {k: v for k, v in skipped.items() if v}
        for method, reason in skipped.items():
            print(f"{name}: {method} left out: {reason}", flush=True)
        run = [s for s in specs if s.name not in skipped]
        if not run:
            continue
        out = {"title": problem.title, "info": problem.info, "skipped": skipped,
               "methods": [run_method(s, problem, settings) for s in run]}
        out["target"] = out["methods"][0]["target"]
        out["plot"] = os.path.join(args.out, f"{stem}-{name}.png")
        os.makedirs(args.out, exist_ok=True)
        plot(out, out["plot"])
        results["problems"][name] = out
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    finish(results, started)
    _write(args.out, f"{stem}-cpu", results)
    return results


def _write(out: str, stem: str, results: dict[str, Any]) -> None:
    """The report and the results, the JSON compact (every seed's curve is in it)."""
    base = write_results(out, stem, results, render(results))
    with open(base + ".json", "w") as f:
        json.dump(results, f, separators=(",", ":"), allow_nan=False)


def merge(out: str) -> dict[str, Any]:
    """One table of the per-problem full runs (``bilevel_suite-full-<problem>-cpu.json``),
    added to the earlier merged table (``bilevel_suite-full-cpu.json``) when there is one: a
    part's methods replace those of the same name, a part already merged adds no time."""
    merged: dict[str, Any] | None = None
    paths = sorted(glob.glob(os.path.join(out, "bilevel_suite-full-*-cpu.json")))
    base = os.path.join(out, "bilevel_suite-full-cpu.json")
    if paths and os.path.exists(base):
        with open(base) as f:
            merged = json.load(f)
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if merged is None:
            merged = {**part, "problems": {}, "wall_seconds": 0.0, "parts": []}
        for name, problem in part["problems"].items():  # a problem's families may be apart
            known = merged["problems"].setdefault(name, {**problem, "methods": []})
            names = {m["method"] for m in problem["methods"]}
            known["methods"] = [m for m in known["methods"] if m["method"] not in names]
            known["methods"] += problem["methods"]
            known["skipped"] = {**known.get("skipped", {}), **problem.get("skipped", {})}
            for method in names:
                known["skipped"].pop(method, None)
        if part["command"] not in merged["parts"]:
            merged["wall_seconds"] += part["wall_seconds"]
            merged["parts"].append(part["command"])
    if merged is None:
        raise FileNotFoundError(f"no full per-problem results in {out}")
    merged["command"] = "; ".join(merged["parts"])
    merged["problems"] = {k: merged["problems"][k] for k in PROBLEMS if k in merged["problems"]}
    order = [m.name for m in METHODS + EXTERNAL]
    for name, problem in merged["problems"].items():
        problem["methods"].sort(key=lambda m: order.index(m["method"]))
        problem["plot"] = os.path.join(out, f"bilevel_suite-full-{name}.png")
        plot(problem, problem["plot"])
    _write(out, "bilevel_suite-full-cpu", merged)
    return merged


if __name__ == "__main__":
    main()

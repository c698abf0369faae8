"""The report of a run: ``results.json`` (one schema for both recipes), the table and the plots.

``results.json``::

    {"recipe": "vision" | "gpt-glue", "config": {...}, "world_size": 1, "wall_seconds": 412.0,
     "pretext_losses": [...],
     "targets": {"<target>": {"metric": "top1",
                              "only_ft": <method>, "bissl_ft": <method>,   # see common.method
                              "bissl_history": [{"alternation", "lam", "lower_loss", ...}],
                              "avg_diff_points": 1.2,
                              "comparison": {"<column>": {"diff", "ci", "p_value", ...}}}},
     "summary": {"Only-FT": {"<column>": {"mean", "std", "n"}}, "BiSSL+FT": {...}},
     "epochs": {"Only-FT": {"<target>": {"mean", "std", "n"}}, "BiSSL+FT": {...}},
     "comparisons": {"<column>": {...}},   # paired over seeds, see common.stats; null: unpaired
     "table": "..."}

``epochs`` are the fine-tuning epochs the retrains trained (fewer than ``finetune.epochs`` under
early stopping, ``finetune.patience``); the table prints them beside the test scores.

Columns are the targets (``<target> <metric>`` where a target reports several test metrics).
Plots in ``plots/``: ``<target>.png`` (BiSSL+FT vs Only-FT), ``<target>_bissl.png`` (the BiSSL
curves), ``<target>_monitor.png`` (the transfer monitor, with ``bissl.monitor_every``) and
``pretext_loss.png``.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import load_checkpoint
from .config import config_to_dict
from .report import (
    format_comparisons,
    format_table,
    plot_bars,
    plot_curves,
    plot_monitor,
    write_json,
)
from .stats import compare_methods

__all__ = ["METHODS", "epochs_table", "report", "table_with_diff"]

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


def report(recipe: Any, wall_seconds: float | None = None) -> dict[str, Any]:
    """Collect every target's stage files into ``results.json``, print the table, draw plots."""
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
    }
    write_json(results, out / "results.json")
    print(f"wrote {out / 'results.json'} and plots in {out / 'plots'}", flush=True)
    return results

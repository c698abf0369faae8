"""The ``study`` command: Only-FT against BiSSL+FT as a designed experiment with paired seeds.

The thesis's claim (Table 6.1, Fig. 6.5 and Table F.5) is that BiSSL+FT beats Only-FT, most
clearly when fine-tuning is short, and varies less over seeds. The study tests it on any data
the recipe supports:

1. the prerequisite stages of the pipeline (:mod:`recipes.common.pipeline`), reused when they are
   finished under the same configuration: ``pretext`` (with the small-scale rule of Sec. 6.1.4
   where the recipe applies it: Only-FT starts from ``pretext_baseline.pt``, pretrained further by
   about the pretext steps BiSSL's lower level takes), ``only-ft`` when the head warm-up takes its
   (lr, wd) from it, ``head-warmup`` and ``bissl``;
2. per fine-tuning budget ``b`` of ``study.epochs`` and per method, one *cell*: (lr, wd) searched
   on the validation split with trials of ``b`` epochs (``finetune.search``, ``finetune.select``),
   then the choice retrained over ``study.seeds`` and tested. Seed ``s`` of both methods is the
   same fine-tuning seed, so the head initialisation and the data order are the same
   (:meth:`Recipe.train_eval` seeds both from ``s`` alone) and the runs are paired;
3. per budget the paired statistics of :mod:`recipes.common.stats` (mean ± std of each method,
   the mean difference with its 95% interval, the paired t-test, the Wilcoxon test, the ratio of
   standard deviations), a Markdown table laid out as Table F.5 with significant differences in
   bold, a plot laid out as Fig. 6.5 and ``study.json`` (every run, the configuration, the code
   version, the protocol).

Every choice (λ, T, N_L, N_U, the IJ solver, the learning rates) is made on validation data
before the test split is read: the BiSSL settings come from the configuration, each cell's
(lr, wd) from its validation search, and the test split is read only by the retrains of that
choice. Each cell is written atomically when it finishes (``study/<target>/e<b>_<method>.json``
with its configuration record, :mod:`recipes.common.fingerprint`), so a killed study continues
from its finished cells; a cell recorded under another configuration stops the study unless
``--allow-changed-config``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import implicitbilevel

from . import fingerprint
from .config import config_to_dict
from .pipeline import Recipe
from .report import write_json
from .stats import PairedComparison, compare_methods
from .sweep import plot_sweep

__all__ = ["METHODS", "cell_config", "code_version", "prerequisites", "run_study",
           "study_table"]

METHODS = {"Only-FT": "only_ft", "BiSSL+FT": "bissl_ft"}


def prerequisites(recipe: Recipe) -> list[str]:
    """The pipeline stages the cells need: ``pretext``, ``only-ft`` (only when the head warm-up
    inherits Only-FT's (lr, wd)), ``head-warmup`` and ``bissl``."""
    w = recipe.cfg.warmup
    inherit = w.lr is None or w.weight_decay is None
    return ["pretext", *(["only-ft"] if inherit else []), "head-warmup", "bissl"]


def cell_config(cfg: Any, epochs: float) -> Any:
    """The configuration of a budget's cells: ``finetune`` with ``epochs`` for the search trials
    and the retrains, ``study.seeds`` and the study's search size; no checkpoints."""
    ft, study = cfg.finetune, cfg.study
    trials = ft.search_trials if study.search_trials is None else study.search_trials
    cell_ft = dataclasses.replace(ft, epochs=float(epochs), search_epochs=0.0,
                                  seeds=list(study.seeds), search_trials=trials,
                                  save_checkpoints=False)
    return dataclasses.replace(cfg, finetune=cell_ft)


def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit and whether the tree differs
    from it."""
    out: dict[str, Any] = {"implicitbilevel": implicitbilevel.__version__, "git_commit": None,
                           "git_dirty": None}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    out.update(git_commit=commit or None, git_dirty=bool(status.strip()))
    return out


def _cell_path(recipe: Recipe, target: str, epochs: float, method: str) -> Path:
    return recipe.out / "study" / target / f"e{epochs:g}_{METHODS[method]}.json"


def _source(recipe: Recipe, target: str, method: str) -> Path:
    if method == "BiSSL+FT":
        return recipe.path(target, "bissl.pt")
    return recipe.path(None, "pretext_baseline.pt" if recipe.baseline_extra() else "pretext.pt")


def _run_cell(recipe: Recipe, target: str, epochs: float, method: str, chosen: Any,
              allow_changed: bool, overwrite: bool) -> dict[str, Any]:
    """One cell: reused when finished under the same configuration, else searched, retrained,
    tested and written atomically."""
    path, cfg = _cell_path(recipe, target, epochs, method), cell_config(recipe.cfg, epochs)
    allowed = fingerprint.check(path, "finetune", cfg, allow_changed) if path.exists() else []
    if path.exists() and not overwrite:
        result = json.loads(path.read_text())
        result["reused"] = True
        return result
    recipe.on_main(lambda: fingerprint.stamp(path, "finetune", cfg, allowed))
    search = method == "Only-FT" or cfg.finetune.search_after_bissl
    start = time.perf_counter()
    result = recipe.fine_tune(target, _source(recipe, target, method), method, search,
                              None if search else chosen, ft=cfg.finetune)
    result.update(epochs=float(epochs), wall_seconds=time.perf_counter() - start)
    recipe.on_main(lambda: write_json(result, path))
    result["reused"] = False
    return result


def compare_cell(only: dict[str, Any], bissl: dict[str, Any], key: str,
                 study: Any) -> PairedComparison:
    """The paired statistics of BiSSL+FT against Only-FT on ``test_<key>`` (pairs by seed)."""
    comparison = compare_methods(only, bissl, f"test_{key}", alpha=study.alpha,
                                 wilcoxon=study.wilcoxon, bootstrap=study.bootstrap)
    if comparison is None:
        raise ValueError("the study's cells were not run over the same seeds (study.seeds)")
    return comparison


def study_table(rows: list[dict[str, Any]], scale: float = 100.0) -> str:
    """A Markdown table laid out as Table F.5 (a column per budget), plus the paired statistics:
    the better method's cell is bold where the difference is significant (as the thesis marks
    it), then the difference with its 95% interval, the t-test's p-value, the Wilcoxon p-value
    and the std ratio (BiSSL+FT over Only-FT)."""
    def cell(stats: dict[str, Any], bold: bool) -> str:
        text = f"{scale * stats['mean']:.1f} ± {scale * stats['std']:.1f}"
        return f"**{text}**" if bold else text

    def p(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.3g}"

    lines = [["FT epochs", *[f"{r['epochs']:g}" for r in rows]]]
    for method in ("BiSSL+FT", "Only-FT"):
        sign = 1 if method == "BiSSL+FT" else -1
        lines.append([method, *[cell(r[method], r["comparison"]["significant"]
                                     and sign * r["comparison"]["diff"] > 0) for r in rows]])
    lines.append(["diff [95% CI]", *[
        f"{scale * c['diff']:+.1f} [{scale * c['ci'][0]:+.1f}, {scale * c['ci'][1]:+.1f}]"
        if c["ci"][0] == c["ci"][0] else f"{scale * c['diff']:+.1f}"
        for c in (r["comparison"] for r in rows)]])
    lines.append(["p (paired t)", *[p(r["comparison"]["p_value"]) for r in rows]])
    lines.append(["p (Wilcoxon)", *[p(r["comparison"]["wilcoxon_p"]) for r in rows]])
    lines.append(["std ratio", *[f"{r['comparison']['std_ratio']:.2f}" for r in rows]])
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "---|" * len(lines[0]))
    return "\n".join(out)


def _protocol(recipe: Recipe, stages: list[str]) -> dict[str, Any]:
    cfg = recipe.cfg
    return {
        "selection": "validation split only",
        "order": ("the BiSSL settings (λ, T, N_L, N_U, IJ solver, learning rates) are fixed by "
                  "the configuration before the study; each cell's (lr, wd) is chosen by its "
                  "search on the validation split before the cell's retrains read the test "
                  "split; no test score feeds any choice"),
        "fixed": {"bissl": dataclasses.asdict(cfg.bissl),
                  "warmup": dataclasses.asdict(cfg.warmup)},
        "search": {"kind": cfg.finetune.search, "select": cfg.finetune.select,
                   "search_after_bissl": cfg.finetune.search_after_bissl,
                   "trials_per_cell": cell_config(cfg, 1.0).finetune.search_trials,
                   "search_seed": cfg.finetune.search_seed},
        "pairing": ("seed s of both methods is the same fine-tuning seed: same head "
                    "initialisation, same training-data order"),
        "prerequisite_stages": stages,
        "only_ft_source": _source(recipe, recipe.targets[0], "Only-FT").name
        if recipe.targets else None,
        "baseline_extra_pretraining": recipe.baseline_extra(),
        "bissl_lower_pretext_steps": cfg.bissl.alternations * cfg.bissl.lower_steps,
        "bissl_lower_pretext_examples": (cfg.bissl.alternations * cfg.bissl.lower_steps
                                         * cfg.bissl.lower_batch_size),
    }


def run_study(recipe: Recipe, overwrite: bool = False,
              allow_changed_config: bool = False) -> dict[str, Any]:
    """Run (or continue) the study of ``recipe.cfg.study``; returns what ``study.json`` holds.

    ``overwrite`` runs finished cells again (the prerequisite stages are always reused when
    finished under the same configuration)."""
    start = time.perf_counter()
    stages = prerequisites(recipe)
    for stage in stages:  # resume=True: a killed BiSSL stage continues from its checkpoint
        recipe.run_stages([stage], resume=True, skip_done=True,
                          allow_changed_config=allow_changed_config)
    prereq_seconds = time.perf_counter() - start
    study = recipe.cfg.study
    targets: dict[str, Any] = {}
    for target in recipe.targets:
        key = recipe.objective(target).key
        rows = []
        for epochs in study.epochs:
            only = _run_cell(recipe, target, epochs, "Only-FT", None, allow_changed_config,
                             overwrite)
            bissl = _run_cell(recipe, target, epochs, "BiSSL+FT",
                              (only["lr"], only["weight_decay"]), allow_changed_config,
                              overwrite)
            comparison = compare_cell(only, bissl, key, study).to_dict()
            rows.append({"epochs": float(epochs), "Only-FT": only["summary"][f"test_{key}"],
                         "BiSSL+FT": bissl["summary"][f"test_{key}"],
                         "comparison": comparison, "cells": {"Only-FT": only,
                                                             "BiSSL+FT": bissl}})
            recipe.say(f"study {target} {epochs:g} epochs: BiSSL+FT - Only-FT "
                       f"{100 * comparison['diff']:+.2f} points, p = {comparison['p_value']:.3g}"
                       f"{' (significant)' if comparison['significant'] else ''}")
        targets[target] = {"metric": key, "rows": rows, "table": study_table(rows)}
    result = {
        "recipe": recipe.name,
        "config": config_to_dict(recipe.cfg),
        "code_version": code_version(),
        "protocol": _protocol(recipe, stages),
        "epochs": [float(e) for e in study.epochs],
        "seeds": list(study.seeds),
        "alpha": study.alpha,
        "targets": targets,
        "prerequisite_seconds": prereq_seconds,
        "cell_seconds": sum(c["wall_seconds"] for t in targets.values() for r in t["rows"]
                            for c in r["cells"].values() if not c["reused"]),
        "wall_seconds": time.perf_counter() - start,
    }
    if recipe.dist.is_main:
        _write(recipe, result)
    return result


def _write(recipe: Recipe, result: dict[str, Any]) -> None:
    folder = recipe.out / "study"
    for target, entry in result["targets"].items():
        recipe.say(f"\nstudy {target}: test {entry['metric']} ×100, mean ± std over "
                   f"{len(result['seeds'])} paired seeds; bold: significant at α = "
                   f"{result['alpha']:g} (paired t-test)\n{entry['table']}")
    plot = {"label": "fine-tuning epochs", "values": result["epochs"],
            "targets": {t: {m: [r[m] for r in e["rows"]] for m in ("BiSSL+FT", "Only-FT")}
                        for t, e in result["targets"].items()}}
    plot_sweep(plot, folder / "study.png")
    (folder / "study.md").write_text("\n\n".join(
        f"### {t} (test {e['metric']})\n\n{e['table']}" for t, e in result["targets"].items())
        + "\n")
    write_json(result, folder / "study.json")
    recipe.say(f"wrote {folder / 'study.json'}, study.md and study.png "
               f"({result['wall_seconds'] / 60:.1f} min)")

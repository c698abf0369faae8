"""The ``study`` command: Only-FT against BiSSL+FT as a replicated experiment.

The thesis's claim (Table 6.1, Fig. 6.5 and Table F.5) is that BiSSL+FT beats Only-FT, most
clearly when fine-tuning is short, and varies less over seeds. A single BiSSL run and a single
baseline pretraining cannot test a claim about the *method*: every fine-tuning seed of such a study
shares one draw of everything that differs between the methods. The study therefore

1. runs ``study.replicates`` (R) independent replicates of every stage that differs between the
   methods (:mod:`recipes.common.replicates`: head warm-up and BiSSL for BiSSL+FT, the Sec. 6.1.4
   extra pretraining for Only-FT, the pretext stage too with ``study.replicate_pretext``), cached
   per replicate and spread over the ranks under ``torchrun``;
2. per replicate ``r``, budget ``b`` of ``study.epochs`` and method, runs one *cell*: (lr, wd)
   searched on the validation split with trials of ``b`` epochs, then the choice retrained over
   the replicate's fine-tuning seeds (nested in the replicate, the same for both methods: paired)
   and tested; each cell is written atomically (``study/<target>/r<r>/e<b>_<method>.json`` with its
   configuration record), so a killed study continues from its finished cells and replicates;
3. analyses each (target, budget) at the replicate level (:func:`recipes.common.stats.
   replicate_comparison`: the paired difference of replicate means with its interval, paired t and
   Wilcoxon over replicates, a hierarchical bootstrap over replicates and seeds, Cohen's d_z, and
   the Pitman-Morgan test of the seed spreads), adjusts the p-values over every cell of the study
   (``study.correction``), and writes ``study.json``, ``study.md`` (the tables and the summary
   sentences of :mod:`recipes.common.conclusions`) and ``study.png``.

Every choice (λ, T, N_L, N_U, the IJ solver, the learning rates) is made on validation data
before the test split is read: the BiSSL settings come from the configuration, each cell's
(lr, wd) from its validation search, and the test split is read only by the retrains.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import implicitbilevel

from . import fingerprint, records
from .conclusions import analyse, study_markdown, study_table
from .config import config_to_dict
from .pipeline import Recipe
from .replicates import finetune_seeds, replicate_stages, replicate_view, run_replicates
from .report import write_json
from .runtime import derive_seed
from .sweep import plot_sweep

__all__ = ["METHODS", "cell_config", "code_version", "prerequisites", "run_study",
           "study_table"]

METHODS = {"Only-FT": "only_ft", "BiSSL+FT": "bissl_ft"}


def prerequisites(recipe: Recipe) -> list[str]:
    """The pipeline stages every replicate needs: ``pretext`` (shared unless
    ``study.replicate_pretext``), ``only-ft`` (only when the head warm-up inherits Only-FT's
    (lr, wd)), ``head-warmup`` and ``bissl``."""
    return ["pretext", *replicate_stages(recipe)]


def cell_config(cfg: Any, epochs: float) -> Any:
    """The configuration of a replicate's cells (``cfg`` is the replicate's: its ``run.seed`` is
    the replicate seed): ``finetune`` with ``epochs`` for the search trials and the retrains, the
    replicate's fine-tuning seeds and search seed, the study's search size; no checkpoints."""
    ft, study = cfg.finetune, cfg.study
    trials = ft.search_trials if study.search_trials is None else study.search_trials
    rep = cfg.run.seed
    cell_ft = dataclasses.replace(
        ft, epochs=float(epochs), search_epochs=0.0, seeds=finetune_seeds(rep, study.seeds),
        search_trials=trials, save_checkpoints=False,
        search_seed=derive_seed(rep, "search", ft.search_seed) % 2**31)
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


def _cell_path(out: Path, target: str, r: int, epochs: float, method: str) -> Path:
    return out / "study" / target / f"r{r}" / f"e{epochs:g}_{METHODS[method]}.json"


def _source(recipe: Recipe, target: str, method: str) -> Path:
    if method == "BiSSL+FT":
        return recipe.path(target, "bissl.pt")
    return recipe.path(None, "pretext_baseline.pt" if recipe.baseline_extra() else "pretext.pt")


def _run_cell(recipe: Recipe, path: Path, target: str, epochs: float, method: str, chosen: Any,
              allow_changed: bool, overwrite: bool) -> dict[str, Any]:
    """One cell of the replicate ``recipe`` currently is: reused when finished under the same
    configuration, else searched, retrained, tested and written atomically to ``path``."""
    cfg = cell_config(recipe.cfg, epochs)
    fp, source = fingerprint.fingerprint(cfg, "finetune"), _source(recipe, target, method)
    if path.exists() and not overwrite:
        why = _stale(recipe, path, fp, source, allow_changed)
        if why is None:  # its record vouches for it: made under this configuration, from this file
            result = json.loads(path.read_text())
            result["reused"] = True
            return result
        # Never reused under other settings: --allow-changed-config runs the cell again.
        recipe.say(f"study cell {records.relative(recipe.out, path)}: {why}: running it again")
    recipe.on_main(lambda: records.remove_record(path))  # no record until the outputs exist
    search = method == "Only-FT" or cfg.finetune.search_after_bissl
    start = time.perf_counter()
    result = recipe.fine_tune(target, source, method, search, None if search else chosen,
                              ft=cfg.finetune)
    result.update(epochs=float(epochs), wall_seconds=time.perf_counter() - start)

    def save() -> None:
        write_json(result, path)
        records.write_record(recipe.out, path, "finetune", target, fp, [path],
                             inputs={"source": records.digests(recipe.out, [source])})

    recipe.on_main(save)
    result["reused"] = False
    return result


def _stale(recipe: Recipe, path: Path, fp: dict[str, Any], source: Path,
           allow_changed: bool) -> str | None:
    """Why the finished cell at ``path`` cannot be reused (``None``: it can): no record (killed,
    or written by an older version), another configuration (refused unless ``allow_changed``),
    or another source file."""
    problem = records.check_done(recipe.out, path, "finetune", fp, "study cell")
    if problem is not None:
        if problem.kind == "config" and not allow_changed:
            raise problem.error()
        return "; ".join(problem.changes) or problem.kind
    recorded = (records.read_record(records.record_path(path)) or {}).get("inputs", {})
    if recorded.get("source") != records.digests(recipe.out, [source]):
        return f"made from another {records.relative(recipe.out, source)}"
    return None


def _scores(cell: dict[str, Any], key: str) -> list[float]:
    return [float(run[f"test_{key}"]) for run in cell["runs"]]


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
                   "search_seed": "derived per replicate from finetune.search_seed"},
        "replicates": {"count": cfg.study.replicates,
                       "replicated_stages": stages[1:] + (["pretext"] if cfg.study.
                                                           replicate_pretext else []),
                       "shared_pretext": not cfg.study.replicate_pretext,
                       "only_ft_extra_pretraining_per_replicate": recipe.baseline_extra()},
        "pairing": ("within a replicate, seed s of both methods is the same fine-tuning seed "
                    "(same head initialisation, same training-data order) and the same search "
                    "seed; the tests run over the replicate means"),
        "correction": cfg.study.correction,
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

    ``overwrite`` runs finished cells again (the replicates' stages are always reused when
    finished under the same configuration)."""
    start = time.perf_counter()
    stages = prerequisites(recipe)
    study, out = recipe.cfg.study, recipe.out
    # one process: replicate by replicate (stages, then cells), so that a stopped study has whole
    # replicates; under torchrun every replicate's stages first, spread over the ranks
    alone = recipe.dist.world_size == 1
    rep_cfgs = run_replicates(recipe, allow_changed_config, only=[0] if alone else None)
    prereq_seconds = time.perf_counter() - start
    targets: dict[str, Any] = {}
    cells: dict[tuple[str, float, int], dict[str, Any]] = {}
    for r in range(study.replicates):
        if alone and r > 0:
            stage_start = time.perf_counter()
            rep_cfgs = run_replicates(recipe, allow_changed_config, only=[r])
            prereq_seconds += time.perf_counter() - stage_start
        for target in recipe.targets:
            with replicate_view(recipe, r):
                for epochs in study.epochs:
                    only = _run_cell(recipe, _cell_path(out, target, r, epochs, "Only-FT"),
                                     target, epochs, "Only-FT", None, allow_changed_config,
                                     overwrite)
                    bissl = _run_cell(recipe, _cell_path(out, target, r, epochs, "BiSSL+FT"),
                                      target, epochs, "BiSSL+FT",
                                      (only["lr"], only["weight_decay"]),
                                      allow_changed_config, overwrite)
                    cells[(target, float(epochs), r)] = {"Only-FT": only, "BiSSL+FT": bissl}
    for target in recipe.targets:
        key = recipe.objective(target).key
        rows = []
        for epochs in study.epochs:
            reps = [cells[(target, float(epochs), r)] for r in range(study.replicates)]
            rows.append({"epochs": float(epochs),
                         "Only-FT": [_scores(c["Only-FT"], key) for c in reps],
                         "BiSSL+FT": [_scores(c["BiSSL+FT"], key) for c in reps],
                         "comparison": None, "cells": reps})
        targets[target] = {"metric": key, "rows": rows}
    analyse(targets, alpha=study.alpha, correction=study.correction, wilcoxon=study.wilcoxon,
            bootstrap=study.bootstrap)
    for target, entry in targets.items():
        for row in entry["rows"]:
            c = row["comparison"]
            recipe.say(f"study {target} {row['epochs']:g} epochs: BiSSL+FT - Only-FT "
                       f"{100 * c['diff']:+.2f} points over {c['replicates']} replicates, "
                       f"adjusted p = {c['p_adjusted']}"
                       f"{' (significant)' if c['significant'] else ''}")
    result = {
        "recipe": recipe.name,
        "config": config_to_dict(recipe.cfg),
        "code_version": code_version(),
        "protocol": _protocol(recipe, stages),
        "epochs": [float(e) for e in study.epochs],
        "replicates": study.replicates,
        "seeds": list(study.seeds),
        "replicate_seeds": [c.run.seed for c in rep_cfgs],
        "alpha": study.alpha,
        "correction": study.correction,
        "targets": targets,
        "prerequisite_seconds": prereq_seconds,
        "cell_seconds": sum(c[m]["wall_seconds"] for c in cells.values() for m in METHODS
                            if not c[m]["reused"]),
        "wall_seconds": time.perf_counter() - start,
    }
    if recipe.dist.is_main:
        _write(recipe, result)
    return result


def _write(recipe: Recipe, result: dict[str, Any]) -> None:
    folder = recipe.out / "study"
    text = study_markdown(result)
    recipe.say("\n" + text)
    plot = {"label": "fine-tuning epochs", "values": result["epochs"], "targets": {
        t: {m: [{"mean": r["comparison"][f"mean_{k}"], "std": r["comparison"][f"between_std_{k}"]}
                for r in e["rows"]] for m, k in METHODS.items()}
        for t, e in result["targets"].items()}}
    plot_sweep(plot, folder / "study.png")
    (folder / "study.md").write_text(text + "\n")
    write_json(result, folder / "study.json")
    recipe.say(f"wrote {folder / 'study.json'}, study.md and study.png "
               f"({result['wall_seconds'] / 60:.1f} min)")

"""Independent replicates of the stages that differ between Only-FT and BiSSL+FT (the ``study``).

A replicate ``r`` of ``study.replicates`` repeats, under its own seed
``replicate_seed(run.seed, r)``, every stage whose randomness the two methods do not share:

* BiSSL+FT: the head warm-up and the BiSSL stage (their data order, head initialisation and
  lower-level batch stacks are seeded by ``run.seed``, which the replicate replaces);
* Only-FT: the longer pretraining of the Sec. 6.1.4 baseline (``pretext_baseline.pt``), its own
  run of one schedule under the replicate's seed (initial weights, data order, augmentations);
* with ``study.replicate_pretext`` the pretext stage as well (else one ``pretext.pt`` is shared).

Each replicate is a run folder of its own, ``<out>/study/replicates/r<r>/``, holding the stages'
outputs and their configuration records, so a killed study reuses every finished stage of every
replicate. Under ``torchrun`` the replicates' stages are spread over the ranks (replicate ``r`` on
rank ``r mod world``, each rank running its stages alone), like the fine-tuning trials.

The fine-tuning seeds nest inside the replicates: replicate ``r``'s seeds are
:func:`finetune_seeds` of its seed, and so is its (lr, wd) search seed; both methods of a
replicate use the same ones (paired).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import fingerprint, records
from .pipeline import Recipe
from .runtime import DistributedContext, derive_seed

__all__ = ["finetune_seeds", "replicate_folder", "replicate_seed", "replicate_stages",
           "replicate_view", "run_replicates"]

_SEED_RANGE = 2**31  # seeds that every library takes


def replicate_seed(seed: int, r: int) -> int:
    """The seed of replicate ``r`` of a study with ``run.seed = seed``."""
    return derive_seed(seed, "study-replicate", r) % _SEED_RANGE


def finetune_seeds(rep_seed: int, seeds: list[int]) -> list[int]:
    """The fine-tuning seeds nested in a replicate: one per ``study.seeds`` entry."""
    return [derive_seed(rep_seed, "finetune", s) % _SEED_RANGE for s in seeds]


def replicate_folder(out: Path, r: int) -> Path:
    """Where replicate ``r``'s stages live."""
    return out / "study" / "replicates" / f"r{r}"


@contextmanager
def replicate_view(recipe: Recipe, r: int, local: bool = False) -> Iterator[Any]:
    """Within the block ``recipe`` is replicate ``r``: ``run.seed`` is the replicate's seed and the
    run folder is :func:`replicate_folder`; ``local`` also makes this process a world of one.
    Yields the replicate's config."""
    cfg, out, ctx = recipe.cfg, recipe.out, recipe.dist
    folder = replicate_folder(out, r)
    folder.mkdir(parents=True, exist_ok=True)
    seed = replicate_seed(cfg.run.seed, r)
    recipe.cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=seed, out_dir=str(folder)))
    recipe.out = folder
    if local:
        recipe.dist = DistributedContext(0, 1, ctx.device, None)
    try:
        yield recipe.cfg
    finally:
        recipe.cfg, recipe.out, recipe.dist = cfg, out, ctx


def replicate_stages(recipe: Recipe) -> list[str]:
    """The pipeline stages each replicate runs (``only-ft`` only when the head warm-up inherits
    Only-FT's (lr, wd))."""
    w = recipe.cfg.warmup
    inherit = w.lr is None or w.weight_decay is None
    return [*(["only-ft"] if inherit else []), "head-warmup", "bissl"]


def _extra_pretraining(recipe: Recipe, allow_changed: bool) -> None:
    """Sec. 6.1.4's baseline of this replicate: its own run of one longer schedule under the
    replicate's seed (:meth:`~recipes.common.pipeline.Recipe.pretrain_baseline`); writes
    ``pretext_baseline.pt`` (reused when finished under the same configuration)."""
    path = recipe.path(None, "pretext_baseline.pt")
    fp = fingerprint.fingerprint(recipe.cfg, "pretext")
    if path.exists() and records.check_done(recipe.out, path, "pretext", fp,
                                            "study replicate") is None:
        return  # finished under this configuration (its record written after the file)
    records.remove_record(path)
    losses = recipe.pretrain_baseline()
    records.write_record(recipe.out, path, "pretext", None, fp, [path])
    recipe.say(f"replicate {recipe.cfg.run.seed}: Only-FT baseline pretrained {len(losses)} "
               f"{recipe.pretrain_unit} on one schedule")


def _shared_only_ft(recipe: Recipe) -> bool:
    """Whether Only-FT starts from the same file in every replicate (the shared ``pretext.pt``):
    then its ``only-ft`` stage (which the head warm-up reads its (lr, wd) from) does not depend on
    the replicate and runs once, in the study's run folder."""
    study = recipe.cfg.study
    return ("only-ft" in replicate_stages(recipe) and not study.replicate_pretext
            and not recipe.baseline_extra())


def _copy(source: Path, dest: Path) -> None:
    """Copy a shared stage output into a replicate, with its run record when it has one and the
    other files that record lists (e.g. the GPT recipe's ``tokenizer.json`` beside
    ``pretext.pt``)."""
    pairs = [(source, dest), (fingerprint.fingerprint_path(source),
                              fingerprint.fingerprint_path(dest))]
    try:
        listed = json.loads(pairs[1][0].read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    for name in listed if isinstance(listed, dict) else []:
        if "/" not in name and name not in (source.name, "pretext_baseline.pt"):  # own one
            pairs.append((source.parent / name, dest.parent / name))
    for src, dst in pairs:
        if src.exists() and (not dst.exists() or dst.stat().st_mtime_ns < src.stat().st_mtime_ns):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst.with_name(dst.name + ".tmp"))
            dst.with_name(dst.name + ".tmp").replace(dst)


def _run_stages(recipe: Recipe, stages: list[str], allow_changed: bool,
                reference: dict[str, Any]) -> None:
    """``recipe.run_stages`` telling it (where it takes ``reference``) that the copied shared
    files were made under the study's configuration, not the replicate's."""
    params = inspect.signature(recipe.run_stages).parameters
    extra = {"reference": reference} if reference and ("reference" in params or any(
        p.kind is p.VAR_KEYWORD for p in params.values())) else {}
    recipe.run_stages(stages, resume=True, skip_done=True, allow_changed_config=allow_changed,
                      **extra)


def _one_replicate(recipe: Recipe, base: Path, base_cfg: Any, allow_changed: bool) -> None:
    """The stages of the replicate ``recipe`` currently is (see :func:`replicate_view`)."""
    study = recipe.cfg.study
    reference: dict[str, Any] = {}
    if study.replicate_pretext:
        recipe.run_stages(["pretext"], resume=True, skip_done=True,
                          allow_changed_config=allow_changed)
    else:
        _copy(base / "pretext.pt", recipe.path(None, "pretext.pt"))
        reference["pretext.pt"] = base_cfg
        if recipe.baseline_extra():
            _extra_pretraining(recipe, allow_changed)
    stages = replicate_stages(recipe)
    if _shared_only_ft(recipe):  # the same result in every replicate: copied, not rerun
        stages.remove("only-ft")
        for target in recipe.targets:
            _copy(base / target / "only_ft.json", recipe.path(target, "only_ft.json"))
            reference[f"{target}/only_ft.json"] = base_cfg
    _run_stages(recipe, stages, allow_changed, reference)


def run_replicates(recipe: Recipe, allow_changed: bool = False,
                   only: list[int] | None = None) -> list[Any]:
    """Run (or reuse) the shared pretext stage and the stages of every replicate (of the
    replicates ``only``); returns each replicate's config. Under ``torchrun`` replicate ``r`` runs
    on rank ``r mod world``."""
    study = recipe.cfg.study
    if not study.replicate_pretext:
        shared = ["pretext", *(["only-ft"] if _shared_only_ft(recipe) else [])]
        recipe.run_stages(shared, resume=True, skip_done=True,
                          allow_changed_config=allow_changed)
    world, rank, base, base_cfg = (recipe.dist.world_size, recipe.dist.rank, recipe.out,
                                   recipe.cfg)
    error: Exception | None = None
    for r in range(study.replicates) if only is None else only:
        if r % world != rank:
            continue
        try:
            with replicate_view(recipe, r, local=world > 1):
                _one_replicate(recipe, base, base_cfg, allow_changed)
        except Exception as err:  # exchanged below so that no rank waits for a dead one
            error = err
            break
    if world > 1:
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, None if error is None else repr(error))
        failed = [f"rank {i}: {f}" for i, f in enumerate(flags) if f is not None]
        if failed and error is None:
            raise RuntimeError("a replicate failed on another rank: " + "; ".join(failed))
    if error is not None:
        raise error
    configs = []
    for r in range(study.replicates):
        with replicate_view(recipe, r) as cfg:
            configs.append(cfg)
    return configs

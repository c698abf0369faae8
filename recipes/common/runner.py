"""The stage loop of :class:`~recipes.common.pipeline.Recipe`: which stages run, which are reused,
and their run records (:mod:`recipes.common.records`).

For each planned stage, in order:

* an output that exists is reused only with ``skip_done`` (``--resume``) and only when its record
  holds (:func:`~recipes.common.records.check_done`: the files have their digests, the inputs they
  were made from are unchanged, the configuration is the current one); an output without a record
  belongs to a stage that did not finish and is run again; any other problem stops the run
  (``rerun_stale``: runs the stage again instead, as a sweep's cells do), except that
  ``--allow-changed-config`` reuses it and records the changes in its record;
* a stage that runs first verifies its inputs (:func:`~recipes.common.records.check_inputs`),
  removes its old record, runs, and then writes its record with the digests of what it wrote. A
  stage that fails before touching its old outputs gets their record back.

BiSSL keeps a record of the configuration its trainer checkpoint is made with
(``<target>/bissl/checkpoint.pt.config.json``): ``--resume`` continues the checkpoint only under
that configuration (unless ``--allow-changed-config``), and a fresh run removes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .fingerprint import (
    VERSION,
    ConfigChanged,
    dependency,
    differences,
    fingerprint,
    format_differences,
)
from .records import (
    OUTPUTS,
    Checked,
    Input,
    InputReplaced,
    Unrecorded,
    amend_record,
    check_done,
    check_inputs,
    digests,
    now,
    read_record,
    record_path,
    relative,
    remove_record,
    replaced_inputs,
    restore_record,
    write_record,
)

__all__ = ["STAGES", "plan", "run_stages", "stage_files", "stage_inputs"]

STAGES = ("pretext", "only-ft", "head-warmup", "bissl", "finetune")
REASONS = {"unrecorded": "not finished", "legacy": "recorded before it ran",
           "digest": "changed after its record", "inputs": "made from files replaced since",
           "config": "made with other settings"}
# the config sections a stage reads itself (its other settings come with its inputs)
OWN = {"only-ft": ("finetune",), "head-warmup": ("warmup",), "bissl": ("bissl",),
       "finetune": ("finetune",)}


def plan(recipe: Any, stages: list[str]) -> list[tuple[str, str | None]]:
    """``(stage, target)`` in pipeline order."""
    out: list[tuple[str, str | None]] = [("pretext", None)] if "pretext" in stages else []
    return out + [(s, t) for t in recipe.targets for s in STAGES[1:] if s in stages]


def stage_files(recipe: Any, stage: str, target: str | None) -> list[Path]:
    """The files a stage's record vouches for: its output, plus ``pretext_baseline.pt`` and the
    run's ``tokenizer.json`` (GPT) for pretext, ``bissl_history.json`` for BiSSL."""
    files = [recipe.output(stage, target)]
    if stage == "pretext":
        if recipe.baseline_extra():
            files.append(recipe.path(None, "pretext_baseline.pt"))
        tokenizer = recipe.path(None, "tokenizer.json")
        if tokenizer.exists():
            files.append(tokenizer)
    elif stage == "bissl":
        files.append(recipe.path(target, "bissl_history.json"))
    return files


def _inherits(cfg: Any) -> bool:
    return cfg.warmup.lr is None or cfg.warmup.weight_decay is None


def stage_inputs(recipe: Any, stage: str, target: str | None) -> list[Input]:
    """The files ``stage`` reads, each with the stage that makes it."""
    cfg, pretext = recipe.cfg, Input(recipe.path(None, "pretext.pt"), "pretext")
    choice = Input(recipe.path(target, OUTPUTS["only-ft"]), "only-ft", "choice")
    if stage == "only-ft":
        name = "pretext_baseline.pt" if recipe.baseline_extra() else "pretext.pt"
        return [Input(recipe.path(None, name), "pretext")]
    if stage in ("head-warmup", "bissl"):
        warm = [Input(recipe.path(target, OUTPUTS["head-warmup"]), "head-warmup")]
        return [pretext, *(warm if stage == "bissl" else []),
                *([choice] if _inherits(cfg) else [])]
    if stage == "finetune":
        return [Input(recipe.path(target, OUTPUTS["bissl"]), "bissl"),
                *([] if cfg.finetune.search_after_bissl else [choice])]
    return []


def _agree(recipe: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 (an error stops every rank), its result on every rank."""
    box: list[Any] = [None]
    recipe.on_main(lambda: box.__setitem__(0, fn()))
    if recipe.dist.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _who(stage: str, target: str | None) -> str:
    return f"stage {stage!r}" + (f" ({target})" if target else "")


class _Run:
    """One call of :func:`run_stages`."""

    def __init__(self, recipe: Any, resume: bool, skip_done: bool, overwrite: bool,
                 allow: bool, rerun_stale: bool, reference: Mapping[str, Any] | None,
                 depends: Mapping[str, str] | None) -> None:
        self.recipe, self.out = recipe, recipe.out
        self.resume, self.skip_done, self.overwrite = resume, skip_done, overwrite
        self.allow, self.rerun_stale = allow, rerun_stale
        self.reference, self.depends = dict(reference or {}), dict(depends or {})

    def cfg_for(self, inp: Input) -> Any:
        """The configuration ``inp`` must have been made with (a reused file: its run's)."""
        name = relative(self.out, inp.path)
        return self.reference.get(name, self.reference.get(inp.stage, self.recipe.cfg))

    def reused(self, inp: Input) -> bool:
        """Whether ``inp`` comes from another run (``reference``)."""
        return relative(self.out, inp.path) in self.reference or inp.stage in self.reference

    def decide(self, stage: str, target: str | None) -> bool:
        """Whether ``stage`` runs (on rank 0; see the module docstring)."""
        output, who = self.recipe.output(stage, target), _who(stage, target)
        if self.overwrite or not output.exists():
            return True
        cfg = self.reference.get(stage, self.recipe.cfg)
        current = dependency(cfg, stage, self.depends.get(stage, "all"))
        problem = check_done(self.out, output, stage, current, who)
        if problem is None:
            return False
        if problem.kind == "unrecorded" or self.rerun_stale:
            detail = "; ".join(problem.changes)
            self.recipe.say(f"{who}: {REASONS[problem.kind]} ({detail}): running it again")
            return True
        if self.allow and problem.kind in ("config", "inputs", "legacy"):
            change = {"time": now(), "changes": problem.changes}
            amend_record(output, [change], self._upgrade(stage, target)
                         if problem.kind == "legacy" else None)
            return False
        raise problem.error()

    def _upgrade(self, stage: str, target: str | None) -> Callable[[dict], dict]:
        def upgrade(record: dict[str, Any]) -> dict[str, Any]:
            files = [f for f in stage_files(self.recipe, stage, target) if f.exists()]
            return {"format": 2, "stage": stage, "target": target, "finished": None,
                    "fingerprint": record.get("fingerprint", {}),
                    "outputs": digests(self.out, files), "inputs": {},
                    "allowed_changes": record.get("allowed_changes", [])}
        return upgrade

    def prepare(self, stage: str, target: str | None) -> dict[str, Any]:
        """Before ``stage`` runs (rank 0): verify its inputs, set up BiSSL's checkpoint record,
        remove the old record."""
        output = self.recipe.output(stage, target)
        who, name = _who(stage, target), relative(self.out, record_path(output))
        checked = check_inputs(self.out, stage_inputs(self.recipe, stage, target), who,
                               self.cfg_for, self.allow, name, self.reused)
        carried = self._checkpoint(target, checked, who) if stage == "bissl" else []
        return {"checked": checked, "carried": carried, "old": remove_record(output)}

    def _checkpoint(self, target: str | None, checked: Checked, who: str) -> list[Any]:
        """BiSSL's trainer checkpoint: verify its record when resuming it, else start over;
        returns the changes to carry into the stage's record."""
        ckpt = self.recipe.path(target, "bissl") / "checkpoint.pt"
        pending, fp = record_path(ckpt), fingerprint(self.recipe.cfg, "bissl")
        carried: list[Any] = []
        if self.resume and ckpt.exists():
            record = read_record(pending)
            if record is None:  # a run folder of the recipes before run records
                record = read_record(record_path(self.recipe.output("bissl", target)))
            if record is None:
                if not self.allow:
                    raise Unrecorded(
                        f"{who}: the trainer checkpoint {relative(self.out, ckpt)} has no record "
                        "of the configuration it was made with; run the stage without --resume "
                        "to start over, or pass --allow-changed-config to continue it unverified")
                carried.append({"time": now(), "input": relative(self.out, ckpt),
                                "changes": ["no configuration record: continued unverified"]})
            else:
                diff = format_differences(differences(record.get("fingerprint", {}), fp))
                replaced = replaced_inputs(self.out, record)
                if diff and not self.allow:
                    raise ConfigChanged(
                        f"{self.recipe.path(target, 'bissl')}: the trainer checkpoint was made "
                        "with a different configuration (recorded -> current):\n  "
                        + "\n  ".join(diff) + "\nresume with the recorded values, run the stage "
                        "without --resume to start over, or pass --allow-changed-config to "
                        f"continue under the new ones (recorded in {relative(self.out, pending)})")
                if replaced and not self.allow:
                    raise InputReplaced(
                        f"{who}: the trainer checkpoint was made from files that have been "
                        "replaced since:\n  " + "\n  ".join(replaced) + "\nrun the stage without "
                        "--resume to start over, or pass --allow-changed-config to continue")
                carried = list(record.get("allowed_changes", []))
                if diff or replaced:
                    carried.append({"time": now(), "input": relative(self.out, ckpt),
                                    "changes": diff + replaced})
        else:
            pending.unlink(missing_ok=True)
            ckpt.unlink(missing_ok=True)
        write_record(self.out, ckpt, "bissl", target, fp, [], checked.entries,
                     carried + checked.changes)
        return carried

    def run(self, stage: str, target: str | None) -> None:
        """Run ``stage`` and write its record."""
        recipe, output = self.recipe, self.recipe.output(stage, target)
        box: dict[str, Any] = {}
        recipe.on_main(lambda: box.update(self.prepare(stage, target)))
        try:
            if stage == "pretext":
                recipe.on_main(recipe.stage_pretext)
            elif stage == "head-warmup":
                recipe.on_main(lambda: recipe.stage_head_warmup(target))
            elif stage == "bissl":
                recipe.stage_bissl(target, self.resume)
            else:
                getattr(recipe, "stage_" + stage.replace("-", "_"))(target)
        except BaseException:
            if recipe.dist.is_main and box:
                restore_record(self.out, output, box["old"])
            raise
        recipe.on_main(lambda: self.record(stage, target, box))

    def record(self, stage: str, target: str | None, box: dict[str, Any]) -> None:
        checked: Checked = box["checked"]
        fp = fingerprint(self.recipe.cfg, stage)
        own = OWN.get(stage, ())
        # the settings the inputs were made with, where they differ (allowed) from the current
        fp.update({k: v for k, v in checked.recorded.items()
                   if k != VERSION and k.split(".")[0] not in own})
        write_record(self.out, self.recipe.output(stage, target), stage, target, fp,
                     stage_files(self.recipe, stage, target), checked.entries,
                     box["carried"] + checked.changes)


def run_stages(recipe: Any, stages: list[str], *, resume: bool = False, skip_done: bool = False,
               overwrite: bool = False, allow_changed_config: bool = False,
               rerun_stale: bool = False, reference: Mapping[str, Any] | None = None,
               depends: Mapping[str, str] | None = None) -> None:
    """Run ``stages`` (in :data:`STAGES` order) for every target; see the module docstring.

    ``reference``: the configuration a reused stage's outputs (key: the stage, or a file's path
    relative to the run folder) were made with, where it is not ``recipe.cfg`` (a sweep's cells
    reuse the base run's). ``depends``: per stage, what a finished stage is compared on
    (``"choice"``: Only-FT's (lr, wd) only, as a sweep's base run needs it). A reused file's own
    inputs are checked in its run folder, not here."""
    run = _Run(recipe, resume, skip_done, overwrite, allow_changed_config, rerun_stale,
               reference, depends)
    todo = plan(recipe, stages)
    for stage, target in todo:  # before any work: a finished stage is neither reused nor redone
        output = recipe.output(stage, target)
        if output.exists() and not (skip_done or overwrite):
            recorded = record_path(output).exists()
            raise FileExistsError(
                f"{output} exists: stage {stage!r} is finished; pass --resume to skip it or "
                "--overwrite to run it again" if recorded else
                f"{output} exists without a run record: stage {stage!r} did not finish "
                "(killed?); pass --resume to run it again or --overwrite")
    for stage, target in todo:
        if _agree(recipe, lambda s=stage, t=target: run.decide(s, t)):
            run.run(stage, target)

"""Sweeps: one hyperparameter over a grid the thesis reports, everything else held fixed.

``sweep --param NAME`` runs the stages the parameter affects once per value, in
``out/sweep_<NAME>/<value>/``, and reuses the base run's outputs of every other stage (e.g. a λ
sweep reuses pretext, Only-FT and warm-up; a fine-tuning-epochs sweep reuses BiSSL), each with
its run record (:mod:`recipes.common.records`): a value's stages run again when the configuration
or the reused files changed since they ran (:func:`run_sweep`). It writes
``sweep_<NAME>.json`` (per target, BiSSL+FT and Only-FT per value), prints a table laid out like
the thesis's appendix tables and plots ``sweep_<NAME>.png`` like its figures (test metric vs the
parameter, BiSSL+FT vs Only-FT).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import load_config
from .fingerprint import differences, fingerprint, format_differences
from .jsonio import write_json
from .pipeline import STAGES, Recipe
from .records import read_record, record_path, relative
from .report import _pyplot, _save
from .runner import stage_files

__all__ = ["SWEEPS", "Sweep", "run_sweep"]

AFTER_BISSL = ("bissl", "finetune")


@dataclass(frozen=True)
class Sweep:
    """A sweep: the config key it sets, its grid in ``sweep.*``, the stages it reruns and the
    settings it implies (``key=value``)."""

    key: str
    grid: str
    rerun: tuple[str, ...] = AFTER_BISSL
    fixed: tuple[str, ...] = ()
    label: str = ""


SWEEPS = {
    # Table 6.2
    "lam": Sweep("bissl.lam", "lam", fixed=("bissl.lam_schedule=constant",), label="λ"),
    "alternations": Sweep("bissl.alternations", "alternations", label="T"),
    "upper_steps": Sweep("bissl.upper_steps", "upper_steps", label="N_U"),
    "lower_steps": Sweep("bissl.lower_steps", "lower_steps", label="N_L"),
    "finetune_epochs": Sweep("finetune.epochs", "finetune_epochs", ("only-ft", "finetune"),
                             label="FT epochs"),
    # Table F.6 (λ_min = 1e-8), F.7 (α via --set bissl.lam_alpha=...) and F.8 (either damping via
    # --set bissl.lam_damping=0 or 10)
    "cosine_increase_lam_max": Sweep("bissl.lam_max", "cosine_lam_max",
                                     fixed=("bissl.lam_schedule=cosine-increase",),
                                     label="λ_max (cosine increase)"),
    "cosine_decay_lam_max": Sweep("bissl.lam_max", "cosine_lam_max",
                                  fixed=("bissl.lam_schedule=cosine-decay",),
                                  label="λ_max (cosine decrease)"),
    "exp_lam_max": Sweep("bissl.lam_max", "exp_lam_max",
                         fixed=("bissl.lam_schedule=exp-increase",),
                         label="λ_max (exponential increase)"),
    "exp_alpha": Sweep("bissl.lam_alpha", "exp_alpha", fixed=("bissl.lam_schedule=exp-increase",),
                       label="α (exponential increase)"),
    "lam_init": Sweep("bissl.lam", "lam_init", fixed=("bissl.lam_schedule=learnable",),
                      label="σ(λ)_init (learnable λ)"),
}


def _share(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src`` (a hard link where possible), replacing an older ``dst``; a
    missing ``src`` removes ``dst``."""
    if not src.exists():
        dst.unlink(missing_ok=True)
        return
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.share")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _reused(base: Recipe, stages: tuple[str, ...]) -> list[tuple[str | None, str]]:
    """The files of the reused ``stages`` of the base run, with their run records."""
    plan = [("pretext", None)] if "pretext" in stages else []
    plan += [(s, t) for t in base.targets for s in stages if s != "pretext"]
    files: list[tuple[str | None, str]] = []
    for stage, target in plan:
        for path in [*stage_files(base, stage, target), record_path(base.output(stage, target))]:
            files.append((target, relative(base.path(target, ""), path)))
    return files


def _reference_changes(base: Recipe) -> dict[str, list[str]]:
    """Per target, the settings the base run's Only-FT was made with that differ now: the row
    every value shares, and the cells depend only on its (lr, wd) choice."""
    out = {}
    for target in base.targets:
        record = read_record(record_path(base.output("only-ft", target))) or {}
        diff = differences(record.get("fingerprint", {}), fingerprint(base.cfg, "only-ft"))
        if diff:
            out[target] = format_differences(diff)
    return out


def run_sweep(recipe_class: type[Recipe], config: str | Path, overrides: list[str],
              param: str, allow_changed_config: bool = False) -> dict[str, Any]:
    """Run the sweep ``param`` (a key of :data:`SWEEPS`); returns what it writes.

    The base run's stages are reused when their run records hold for what the cells take from
    them (of Only-FT: its (lr, wd) choice). Each value's folder reuses them through hard links
    (records included) and verifies them against the base run's configuration; its own stages
    are reused only when their records hold under the value's configuration and the reused files
    are still those they were made from, else they run again. Where the base run's Only-FT (the
    Only-FT row of every value) was made with other settings of its seed runs, the table says so
    and ``sweep_<param>.json`` lists them (``reference_changes``)."""
    sweep = SWEEPS[param]
    base = recipe_class(load_config(config, recipe_class.config_class, overrides))
    reuse = tuple(s for s in STAGES if s not in sweep.rerun)
    # the base run: the reused stages and what they depend on (the warm-up needs Only-FT's lr)
    base.run_stages(list(STAGES[: max(STAGES.index(s) for s in reuse) + 1]), skip_done=True,
                    allow_changed_config=allow_changed_config, depends={"only-ft": "choice"})
    values = getattr(base.cfg.sweep, sweep.grid)
    rows: dict[str, dict[str, list[Any]]] = {
        t: {"BiSSL+FT": [], "Only-FT": []} for t in base.targets
    }
    for value in values:
        cfg = load_config(config, recipe_class.config_class,
                          [*sweep.fixed, *overrides, f"{sweep.key}={value}"])
        run = recipe_class(cfg, out_dir=base.out / f"sweep_{param}" / str(value))
        run.on_main(lambda run=run: [_share(base.path(target, name), run.path(target, name))
                                     for target, name in _reused(base, reuse)])
        run.run_stages(list(sweep.rerun), skip_done=True, rerun_stale=True,
                       allow_changed_config=allow_changed_config,
                       reference={stage: base.cfg for stage in reuse})
        for target in base.targets:
            metric = f"test_{run.objective(target).key}"
            for method, name in (("BiSSL+FT", "bissl_ft.json"), ("Only-FT", "only_ft.json")):
                rows[target][method].append(run.read_json(target, name)["summary"][metric])
    changes = {} if "only-ft" in sweep.rerun else _reference_changes(base)
    result = {"param": sweep.key, "label": sweep.label or sweep.key, "fixed": list(sweep.fixed),
              "values": values, "targets": rows, "table": sweep_table(sweep, values, rows),
              "reference_changes": changes}
    if base.dist.is_main:
        notes = "".join(f"\nOnly-FT{f' ({t})' if len(rows) > 1 else ''} is the base run's, "
                        f"made with other settings than now: {'; '.join(c)}"
                        for t, c in changes.items())
        base.say(f"\nsweep over {sweep.key} (test ×100, mean ± std)\n{result['table']}{notes}")
        write_json(result, base.out / f"sweep_{param}.json")
        plot_sweep(result, base.out / f"sweep_{param}.png")
    return result


def sweep_table(sweep: Sweep, values: list[Any], rows: dict[str, dict[str, list[Any]]]) -> str:
    """The appendix layout: a column per value, a row per target and method."""
    lines = [[sweep.label or sweep.key, *[f"{v:g}" for v in values]]]
    for target, methods in rows.items():
        for method, stats in methods.items():
            name = f"{target}: {method}" if len(rows) > 1 else method
            lines.append([name, *[f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
                                  for s in stats]])
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in lines)


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Test metric vs the parameter, BiSSL+FT and Only-FT with ± std bars, a panel per target."""
    plt = _pyplot()
    targets = list(result["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.4), squeeze=False)
    values = [float(v) for v in result["values"]]
    spread = max(values) / min(values) if min(values) > 0 else 1.0
    for ax, target in zip(axes[0], targets, strict=True):
        for method, stats in result["targets"][target].items():
            ax.errorbar(values, [100 * s["mean"] for s in stats],
                        yerr=[100 * s["std"] for s in stats], marker="o", capsize=4, label=method)
        if spread >= 100 or not math.isfinite(spread):
            ax.set_xscale("log")
        ax.set_xlabel(result["label"])
        ax.set_ylabel("test (×100)")
        ax.set_title(target)
        ax.legend()
    fig.tight_layout()
    return _save(fig, plt, path)

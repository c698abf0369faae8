"""The command line both recipes share.

    python recipes/<recipe>.py [STAGE ...] [--config FILE] [--set KEY=VALUE ...] [--resume]
    python recipes/<recipe>.py sweep --param NAME [--config FILE] [--set KEY=VALUE ...]
    python recipes/<recipe>.py study [--config FILE] [--set KEY=VALUE ...] [--overwrite]
    python recipes/<recipe>.py --help-config [--config FILE]   # every --set key, its default

``STAGE``: ``all`` (default: every stage, then the report), ``pretext``, ``only-ft``,
``head-warmup``, ``bissl``, ``finetune``, ``report``; several run in the pipeline's order.
Each stage writes its run record after its outputs (the settings they were made with and their
digests, :mod:`recipes.common.records`), and every stage, ``--resume`` or not, verifies the
records of the files it reads: an input made under other settings stops the run naming each
setting with its recorded and current value, and a file changed after its record stops it naming
the file. ``--resume`` continues a killed BiSSL stage from its checkpoint, skips the stages whose
outputs exist with a record that holds (unless ``--overwrite``) and runs again a stage that did
not finish; it stops when a finished stage was recorded under another configuration.
``--allow-changed-config`` goes on in both cases and records each change in the stage's record
(``--resume`` or ``report``). Without ``--resume`` or ``--overwrite`` a finished stage is not run
again. A sweep reuses what still holds under its configuration and runs the rest again; so does a
``study`` (Only-FT vs BiSSL+FT over fine-tuning budgets and paired seeds,
:mod:`recipes.common.study`), which continues from its finished cells (``--overwrite`` runs them
again). While a command runs, ``run.out_dir/.lock`` names its process, and a second command on the
same folder stops at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import load_config
from .help import config_help, plain, stages_help
from .pipeline import STAGES, Recipe
from .report import report
from .run_lock import RunLock
from .study import run_study
from .sweep import SWEEPS, run_sweep

__all__ = ["COMMANDS", "main", "parse_args"]

COMMANDS = ("all", *STAGES, "report", "sweep", "study")


def parse_args(argv: list[str] | None, default_config: Path, doc: str = "",
               config_class: type | None = None) -> argparse.Namespace:
    """The shared command line (see the module docstring).

    ``doc`` (the recipe's docstring) is shown as plain text, followed by every command and sweep
    parameter; with ``config_class``, ``--help-config`` prints every config key (with the values
    of ``--config`` where they differ from the defaults) and exits.
    """
    p = argparse.ArgumentParser(description=plain(doc), epilog=stages_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="*", metavar="STAGE",
                   help=f"one or more of {', '.join(COMMANDS)} (default: all; see below)")
    p.add_argument("--config", default=str(default_config),
                   help=f"YAML config file (default: {_shown(default_config)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set bissl.lam=0.01 (repeatable); "
                        "--help-config lists every key")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its type, default, bounds and meaning, "
                        "and the value --config sets where it differs, then exit")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed BiSSL stage and skip finished stages")
    p.add_argument("--overwrite", action="store_true",
                   help="run finished stages again, replacing their outputs")
    p.add_argument("--allow-changed-config", action="store_true",
                   help="go on although a stage's input or a reused stage was made under "
                        "another configuration (each change is recorded in the stage's record)")
    p.add_argument("--param", choices=sorted(SWEEPS), default="lam", metavar="NAME",
                   help="what `sweep` varies (default: lam; the names are listed below)")
    args = p.parse_args(argv)
    if args.help_config:
        if config_class is None:
            p.error("--help-config needs the recipe's config class")
        try:
            loaded = load_config(args.config, config_class, args.overrides)
        except ValueError as err:
            p.error(str(err))
        print(config_help(config_class, loaded, _shown(Path(args.config))))
        p.exit()
    args.stages = args.stages or ["all"]
    unknown = [s for s in args.stages if s not in COMMANDS]
    if unknown:
        p.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(COMMANDS)}")
    if len(args.stages) > 1 and {"sweep", "all", "study"} & set(args.stages):
        p.error("'all', 'sweep' and 'study' run alone")
    return args


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(recipe_class: type[Recipe], argv: list[str] | None, default_config: Path,
         doc: str = "") -> dict[str, Any] | None:
    """Run the command; returns the results (``all``/``report`` on rank 0) or the sweep's.

    Denormals are flushed while it runs (they slow small CPU models down by orders of
    magnitude), and the thread count and the flag are restored afterwards, as is the absence of
    a process group when this call created it.
    """
    args = parse_args(argv, default_config, doc, recipe_class.config_class)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # stage summaries appear as they finish
    was_flushing = sys.float_info.min / 2 == 0.0
    threads = torch.get_num_threads()
    joined = not (dist.is_available() and dist.is_initialized())
    torch.set_flush_denormal(True)
    lock: RunLock | None = None
    try:
        cfg = load_config(args.config, recipe_class.config_class, args.overrides)
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 holds it for all
            lock = RunLock(cfg.run.out_dir).acquire()
        if args.stages == ["sweep"]:
            return run_sweep(recipe_class, args.config, args.overrides, args.param,
                             allow_changed_config=args.allow_changed_config)
        start = time.perf_counter()
        recipe = recipe_class(cfg)
        if args.stages == ["study"]:
            return run_study(recipe, overwrite=args.overwrite,
                             allow_changed_config=args.allow_changed_config)
        wanted = STAGES if args.stages == ["all"] else [s for s in args.stages if s in STAGES]
        for stage in wanted:
            t0 = time.perf_counter()
            recipe.run_stages([stage], resume=args.resume,
                              skip_done=args.resume and not args.overwrite,
                              overwrite=args.overwrite,
                              allow_changed_config=args.allow_changed_config)
            recipe.say(f"[{stage}] {time.perf_counter() - t0:.1f} s")
        if ("all" in args.stages or "report" in args.stages) and recipe.dist.is_main:
            wall = time.perf_counter() - start
            results = report(recipe, wall, allow_changed_config=args.allow_changed_config)
            print(f"total wall time {wall / 60:.1f} min")
            return results
        return None
    finally:
        if lock is not None:
            lock.release()
        torch.set_flush_denormal(was_flushing)
        torch.set_num_threads(threads)
        if joined and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

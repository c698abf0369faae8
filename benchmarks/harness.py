"""The harness every benchmark script runs on: settings, timing, results, report and command line.

- **Settings**: :func:`set_threads` (one intra-op thread on CPU in ``--quick``, see the README),
  :func:`seeded`, :func:`device_type`, :data:`ROOT`.
- **Timing**: :func:`paired_times` runs a set of callables round-robin (the order rotated every
  repeat) after warm-up runs that are not recorded, so every repeat yields one time per callable
  taken under the same machine load; :func:`ratio` is the median over repeats of the per-repeat
  ratios, :func:`median` the median of one callable's times.
- **Accuracy**: :func:`relative_error` (``‖a − b‖/‖b‖`` in float64).
- **Memory** lives in :mod:`benchmarks.memory`: ``peak_memory`` (peak RSS or CUDA peak over the
  memory before one step) and ``in_subprocess`` (a measurement in a fresh interpreter).
- **Results**: :func:`new_results` (command, machine, settings), :func:`finish` (load at the end,
  wall time), :func:`write_results` (``<stem>.json`` and ``<stem>.md``).
- **Report**: :func:`fmt`, :func:`short`, :func:`error_line`, :func:`quietly`, :func:`row`,
  :func:`table_head`, :func:`met_cell`, :func:`header` (title, command, machine, date),
  :func:`peer_table`, :func:`pyplot` and :func:`save_figure`.
- **Command line**: :func:`parser` and the flags that mean the same in every script
  (:func:`add_modes`, :func:`add_device`, :func:`add_out`, :func:`add_threads`,
  :func:`add_repeats`), :func:`mode_and_device`, :func:`command_line`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(os.path.abspath(__file__)).parent.parent
DEFAULT_OUT = "benchmarks/results"


# -- settings ------------------------------------------------------------------------------------


def device_type(device: torch.device | str) -> str:
    """``"cpu"`` or ``"cuda"`` (the suffix of every results file)."""
    return torch.device(device).type


def set_threads(threads: int | None, device: str = "cpu", mode: str | None = None) -> None:
    """``threads`` intra-op threads; without it one on CPU in ``quick`` mode, else torch's default.

    On a shared 2-core machine two intra-op threads stall whenever another process holds a core
    (a kept-graph GPT HVP took 10 s instead of 0.18 s at load 8); one thread gives stable ratios.
    """
    if threads:
        torch.set_num_threads(threads)
    elif device_type(device) == "cpu" and mode == "quick":
        torch.set_num_threads(1)


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a separate generator with the same seed (for the
    data, so that building models does not shift it)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -- timing --------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the GPU (a no-op on CPU)."""
    if device is not None and device_type(device) == "cuda":
        torch.cuda.synchronize()


def paired_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Time every callable ``repeats`` times, round-robin, after ``warmup`` unrecorded rounds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: Mapping[str, list[float]], num: str | Callable[[int], float],
          den: str | Callable[[int], float]) -> float:
    """Median over repeats of ``num/den``; each side a name in ``times`` or a function of the
    repeat index (to combine several timings of the same repeat)."""
    n = len(next(iter(times.values())))

    def value(side: str | Callable[[int], float], i: int) -> float:
        return times[side][i] if isinstance(side, str) else side(i)

    return statistics.median(value(num, i) / value(den, i) for i in range(n))


def median(values: Iterable[float]) -> float:
    """The median (of one callable's times, say)."""
    return statistics.median(values)


# -- accuracy ------------------------------------------------------------------------------------


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (``‖a − b‖`` where ``b`` is zero)."""
    diff, denom = float((a.double() - b.double()).norm()), float(b.double().norm())
    return diff / denom if denom > 0 else diff


# -- results -------------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, GPU, torch/Python versions, date (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device_type(device) == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def new_results(command: str, device: str, settings: Any, mode: str | None = None
                ) -> dict[str, Any]:
    """The head of every results file: the mode (where there are modes), the command, the machine
    and the settings (a dataclass)."""
    head: dict[str, Any] = {} if mode is None else {"mode": mode}
    head.update(command=command, machine=machine_info(device), settings=asdict(settings))
    return head


def finish(results: dict[str, Any], started: float) -> dict[str, Any]:
    """Record the load average at the end and the wall time since ``started``."""
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - started
    return results


def write_results(out: str | os.PathLike, name: str, results: Mapping[str, Any],
                  markdown: str) -> str:
    """Write ``<out>/<name>.json`` (every number) and ``<out>/<name>.md``; returns the stem."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return stem


# -- report --------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 2) -> str:
    """A number for a table: ``-`` for none, ``n/a`` for NaN, scientific when tiny or huge."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
            return f"{x:.1e}"
        return f"{x:.{digits}f}"
    return str(x)


def short(text: Any, n: int = 90) -> str:
    """``text`` on one line, cut to ``n`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` with its warnings silenced (the peers warn on every call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def error_line(err: BaseException) -> str:
    """An exception as one short line: ``Type: first line of the message`` (300 characters)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def row(*cells: Any) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(*columns: str) -> list[str]:
    """A Markdown table's header row and rule."""
    return [row(*columns), "|" + "---|" * len(columns)]


def met_cell(met: bool | None) -> str:
    """``yes``, ``no`` or ``-`` (not measured)."""
    return "yes" if met else ("no" if met is not None else "-")


def machine_line(m: Mapping[str, Any]) -> str:
    """``- machine: CPU, cores (threads, load average), GPU; torch, Python``."""
    start, end = m.get("load_average"), m.get("load_average_end")
    load = (f"{start[0]:.1f} at start" + (f", {end[0]:.1f} at end" if end else "")
            if start else "unknown")
    return (f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
            f"load average {load})" + (f", GPU {m['gpu']}" if "gpu" in m else "")
            + f"; torch {m['torch']}, Python {m['python']}")


def header(title: str, results: Mapping[str, Any], wall_note: str = "") -> list[str]:
    """A report's title, command, machine and date lines."""
    m = results["machine"]
    return [title, "", f"- command: `{results['command']}`", machine_line(m),
            f"- date: {m['date_utc']}; wall time {results.get('wall_seconds', 0):.0f} s"
            + wall_note]


def peer_table(status: Mapping[str, Mapping[str, Any]],
               note: str = "note / exact error") -> list[str]:
    """Which peer is installed (its version) and, where it is not, the exact error."""
    lines = table_head("peer", "installed", note)
    for st in status.values():
        detail = (st.get("import_error") or st.get("install_error") or st.get("error")
                  or st.get("note", ""))
        lines.append(row(st["package"], st.get("version") or "no", detail))
    return lines


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120,
                rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay the figure out (inside ``rect``), save it to ``path`` and close it."""
    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# -- command line --------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_modes(p: argparse.ArgumentParser, quick: str, full: str) -> None:
    """``--quick`` (the default) or ``--full``."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=quick)
    group.add_argument("--full", action="store_true", help=full)


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda``."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda in --full "
                   "when available, else cpu)")


def add_out(p: argparse.ArgumentParser) -> None:
    """``--out DIR`` (default ``benchmarks/results``)."""
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory")


def add_threads(p: argparse.ArgumentParser, default: int | None = None,
                help: str = "torch intra-op CPU threads (default: 1 on CPU in --quick, see "
                "benchmarks/README.md; torch's default otherwise)") -> None:
    """``--threads N``."""
    p.add_argument("--threads", type=int, default=default, help=help)


def add_repeats(p: argparse.ArgumentParser, default: int | None,
                help: str = "timing repeats") -> None:
    """``--repeats N``: interleaved timing repeats."""
    p.add_argument("--repeats", type=int, default=default, help=help)


def mode_and_device(args: argparse.Namespace) -> tuple[str, str]:
    """``quick`` or ``full``, and the device (default: CUDA in ``full`` where there is one)."""
    mode = "full" if args.full else "quick"
    device = args.device or ("cuda" if args.full and torch.cuda.is_available() else "cpu")
    return mode, device


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: ``python benchmarks/<script> <arguments>``."""
    args = sys.argv[1:] if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{script}", *args])

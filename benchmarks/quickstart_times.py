"""What the README's quick start costs: the install's size and the time of its two commands.

    python benchmarks/quickstart_times.py sizes [--venv DIR]    # the size of an installed venv
    python benchmarks/quickstart_times.py run [--python python3] # a clean clone, timed end to end
    python benchmarks/quickstart_times.py ci-log LOG [--reasons OUT ...]  # a timed .ci/run log

``sizes`` measures a virtual environment that holds the pinned torch (default: the one running
this script): its total size on disk, torch itself, the CUDA libraries the pinned wheel brings
(``nvidia/``, also on a machine without a GPU) and ``triton``. ``run`` clones the repository at
``HEAD`` into a temporary folder, creates a fresh venv there and times the README's two commands
step by step (each install, the vision pipeline, the test command), reads the test summary
(passed, skipped and why) and measures that venv's size. Both merge what they measured into
``benchmarks/results/quickstart-cpu.json`` with the machine (cores, load average, date); the
README states these numbers and ``tests/test_readme.py`` checks that it states them as written
there. ``run`` needs the package registry and about 7 GB of disk, and takes about 15 minutes on
2 idle cores; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quickstart-cpu.json"
TORCH = "pip install torch==2.14.1 torchvision==0.29.1"
COMMANDS = {  # the README's quick start, step by step
    "install_recipes": f'{TORCH} && pip install -e ".[recipes]"',
    "pipeline": "python recipes/vision_bissl.py",
    "install_test": 'pip install -e ".[recipes,test]"',
    "tests": "python -m pytest -q -rs",
}
PARTS = {"torch": "torch", "cuda_libraries": "nvidia", "triton": "triton"}


def _megabytes(path: Path) -> float:
    """The size of ``path`` on disk in MB (10^6 bytes), hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total / 1e6


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages")) or sorted(
        venv.glob("Lib/site-packages"))
    if not found:
        raise SystemExit(f"{venv} is not a virtual environment (no site-packages)")
    return found[0]


def sizes(venv: Path) -> dict[str, Any]:
    """The venv's size and its parts, in GB."""
    site = _site_packages(venv)
    out: dict[str, Any] = {"total_gb": round(_megabytes(venv) / 1e3, 1),
                           "packages": len(list(site.glob("*.dist-info")))}
    for key, folder in PARTS.items():
        out[f"{key}_gb"] = round(_megabytes(site / folder) / 1e3, 1) if (site / folder).exists() \
            else 0.0
    return out


def _machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def parse_summary(output: str) -> dict[str, Any]:
    """``passed``/``skipped`` counts and the skip reasons of a ``pytest -q -rs`` output."""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error)",
                                                     output.splitlines()[-1] if output else "")}
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", output, re.M)))
    return {"passed": counts.get("passed", 0), "skipped": counts.get("skipped", 0),
            "failed": counts.get("failed", 0), "skip_reasons": reasons}


def run(python: str) -> dict[str, Any]:
    """Clone ``HEAD``, make a fresh venv and time the quick start's steps."""
    out: dict[str, Any] = {"machine_start": _machine(), "minutes": {}}
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        clone = Path(tmp) / "implicitbilevel"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run([python, "-m", "venv", str(clone / ".venv")], check=True)
        activate = f". {clone / '.venv' / 'bin' / 'activate'} && "
        for step, command in COMMANDS.items():
            start = time.perf_counter()
            done = subprocess.run(["bash", "-c", activate + command], cwd=clone, text=True,
                                  capture_output=True)
            out["minutes"][step] = round((time.perf_counter() - start) / 60, 1)
            if step == "tests":
                out["tests"] = parse_summary(done.stdout.strip())
            elif done.returncode != 0:
                raise SystemExit(f"{command!r} failed:\n{done.stderr[-2000:]}")
        out["sizes"] = sizes(clone / ".venv")
    out["machine_end"] = _machine()
    return out


def parse_ci_log(log: str, reasons: list[str] = ()) -> dict[str, Any]:
    """The test counts and times of a clean clone's ``time CI=true bash .ci/run`` output.

    ``log`` holds pytest's summary line (``N passed, M skipped … in S s``) and ``time``'s
    ``real XmYs``; ``reasons`` are ``pytest -rs`` outputs that name the skip reasons (the log's own
    ``SKIPPED`` lines count too).
    """
    summary = [line for line in log.splitlines()
               if re.search(r"\d+ (passed|failed)", line) and re.search(r" in [\d.]+s", line)]
    if not summary:
        raise SystemExit("no pytest summary line in the log")
    tests = parse_summary(summary[-1])
    tests["skip_reasons"] = sorted(set(parse_summary(log)["skip_reasons"]).union(
        *(parse_summary(r)["skip_reasons"] for r in reasons)))
    seconds = float(re.search(r" in ([\d.]+)s", summary[-1]).group(1))
    real = re.search(r"^real\s+(\d+)m([\d.]+)s", log, re.M)
    if real is None:
        raise SystemExit("no `time` output (real XmYs) in the log")
    minutes = int(real.group(1)) + float(real.group(2)) / 60
    return {"tests": tests, "minutes": {"tests": round(seconds / 60, 1),
                                        "ci_script": round(minutes, 1)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, merge into the results file and print what was measured."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sizes", help="the size of an installed venv")
    s.add_argument("--venv", default=sys.prefix, help="the venv (default: the running one)")
    s.add_argument("--note", default="", help="what the venv holds (e.g. its extras)")
    r = sub.add_parser("run", help="a clean clone and fresh venv, the two commands timed")
    r.add_argument("--python", default=sys.executable, help="the interpreter of the new venv")
    c = sub.add_parser("ci-log", help="a clean clone's `time CI=true bash .ci/run` output")
    c.add_argument("log", type=Path)
    c.add_argument("--reasons", type=Path, nargs="*", default=[],
                   help="pytest -rs outputs naming the skip reasons")
    c.add_argument("--note", default="", help="the machine's state while it ran")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.what == "ci-log":
        parsed = parse_ci_log(args.log.read_text(), [r.read_text() for r in args.reasons])
        results["clean_clone"] = {
            **parsed, "machine": _machine(),
            "source": "a fresh clone running `CI=true bash .ci/run` (a fresh install, the README's "
                      "test command, ruff, the docs build, sdist and wheel) under `time`, its "
                      f"output read by benchmarks/quickstart_times.py ci-log. {args.note}".strip()}
    elif args.what == "sizes":
        results["install"] = {**sizes(Path(args.venv)), "note": args.note,
                              "machine": _machine()}
    else:
        results["clean_clone"] = {**run(args.python),
                                  "source": "benchmarks/quickstart_times.py run"}
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()

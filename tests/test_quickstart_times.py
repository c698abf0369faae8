"""The quick-start timing script reads a timed CI log: test counts, skip reasons and minutes."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quickstart_times  # noqa: E402

LOG = """\
Successfully installed torch-2.14.1
........................................................................ [ 99%]
....s.                                                                   [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_benchmarks_smoke.py:42: betty is not installed (pip install -e '.[bench]')
SKIPPED [2] tests/test_x.py:19: JAXopt comparison skipped: jax and jaxopt are not installed
1187 passed, 6 skipped, 2 warnings in 283.13s (0:04:43)
All checks passed!

real\t6m36.028s
user\t6m39.166s
"""
EXTRA = """\
SKIPPED [2] tests/test_benchmarks_smoke.py:42: torchopt is not installed (pip install -e '.[bench]')
3 passed, 2 skipped in 1.00s
"""


def test_a_timed_ci_log_is_read():
    parsed = quickstart_times.parse_ci_log(LOG, [EXTRA])
    assert parsed["tests"] == {
        "passed": 1187, "skipped": 6, "failed": 0,
        "skip_reasons": ["JAXopt comparison skipped: jax and jaxopt are not installed",
                         "betty is not installed (pip install -e '.[bench]')",
                         "torchopt is not installed (pip install -e '.[bench]')"]}
    assert parsed["minutes"] == {"tests": round(283.13 / 60, 1),
                                 "ci_script": round(6 + 36.028 / 60, 1)}

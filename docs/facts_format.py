"""Where the measured facts come from and how the pages print numbers (shared by ``facts`` and
``facts_suite``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _sci(value: float) -> str:
    """``1.5e-7`` (one decimal, no padded exponent)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _num(value: float) -> str:
    """A measured ratio as the pages print it: ``15.8``, ``0.37``, ``2.5e-3``."""
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.01 else _sci(value)

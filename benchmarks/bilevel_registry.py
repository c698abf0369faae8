"""The bilevel suite's problems by name: :data:`PROBLEMS` and :func:`build` (the quadratic of
:mod:`benchmarks.bilevel_problems`, the classification problems of
:mod:`benchmarks.bilevel_classification`)."""

from __future__ import annotations

from typing import Any

from benchmarks import bilevel_classification as cls
from benchmarks.bilevel_problems import BenchProblem, quadratic_problem

__all__ = ["PROBLEMS", "build"]

PROBLEMS = ("quadratic", "ijcnn1", "breast_cancer", "digits_multilogreg", "cleaning_50",
            "cleaning_70", "cleaning_90")
"""Every problem of the suite, in the order of its tables."""


def build(name: str, **sizes: Any) -> BenchProblem:
    """The problem ``name`` of :data:`PROBLEMS` (``sizes``: the quadratic's dimensions)."""
    if name == "quadratic":
        return quadratic_problem(**sizes)
    if name in ("ijcnn1", "breast_cancer"):
        return cls.logreg_problem(name)
    if name == "digits_multilogreg":
        return cls.multilogreg_problem()
    if name.startswith("cleaning_"):
        return cls.cleaning_problem(int(name.split("_")[1]) / 100)
    raise KeyError(f"unknown problem {name!r}; known: {PROBLEMS}")

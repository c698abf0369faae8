"""Test configuration: makes the repository root importable so tests can reach ``recipes``."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (steadier timings, and the benchmark runners' setting),
    restored after it. A module uses it for every test with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def facts():
    """``docs/facts.py``: the measured facts the README, the pages and the configs state."""
    docs = os.path.join(ROOT, "docs")
    if docs not in sys.path:  # facts.py and its sibling modules (facts_*.py)
        sys.path.insert(0, docs)
    import facts as module

    return module

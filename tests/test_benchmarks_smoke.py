"""Smoke test of ``benchmarks/``: every measurement on toy sizes, the files it writes, and the
agreement of the peers' implicit-Jacobian solutions with ours."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.measure import memory_worker
from benchmarks.run import Settings, render_markdown, run


@pytest.fixture
def one_thread():
    """Timing on a shared machine is steadier with one intra-op thread (as in ``--quick``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_benchmarks_smoke(tmp_path, one_thread):
    settings = Settings.for_mode("smoke", "cpu")
    results = run("smoke", "cpu", str(tmp_path), "pytest smoke", log=lambda *_: None,
                  settings=settings)

    # Files: JSON (round-trips), Markdown (the tables), the accuracy plot.
    saved = json.loads((tmp_path / "smoke-cpu.json").read_text())
    assert {"machine", "command", "settings", "hvp_solver", "peers", "accuracy", "targets",
            "peer_status"} <= saved.keys()
    assert {"cpu", "cores", "torch", "date_utc"} <= saved["machine"].keys()
    markdown = (tmp_path / "smoke-cpu.md").read_text()
    assert markdown == render_markdown(saved)
    assert "### (3) Peers" in markdown and "| target | measured | met |" in markdown
    assert (tmp_path / "accuracy_vs_iterations.png").stat().st_size > 1000

    for costs in saved["hvp_solver"].values():
        ratios = costs["hvp_over_gradient"]
        assert set(ratios) == {"forward-over-reverse", "reverse-over-reverse", "kept-graph",
                               "kept-graph build"}
        assert all(math.isfinite(r) and r > 0 for r in ratios.values())
        assert math.isfinite(costs["solver"]["cg_bookkeeping_fraction_direct"])

    # The same IJ solve by other code gives the same solution.
    peers = saved["peers"]["peers"]
    ref = peers["reference (double backward per HVP, blockwise CG)"]
    assert ref["compared_with"] == "ours CG blockwise"
    assert ref["rel_diff_u"] < 1e-5 and ref["rel_diff_hypergradient"] < 1e-5
    assert ref["time_over_ours"] > 0
    assert peers["ours CG blockwise"]["rel_diff_u"] < 1e-3  # a heuristic, but close at mu = 1000
    if saved["peer_status"]["torchopt"]["available"]:
        assert peers["TorchOpt custom_root + solve_cg"]["rel_diff_u"] < 1e-5
        assert peers["TorchOpt custom_root + solve_cg"]["rel_diff_hypergradient"] < 1e-5
        assert peers["TorchOpt custom_root default (solve_normal_cg)"]["rel_diff_u"] < 1e-3
    if saved["peer_status"]["betty"]["available"]:
        assert peers["Betty neumann"]["compared_with"] == "ours Neumann"
        assert peers["Betty neumann"]["rel_diff_u"] < 1e-5

    # Accuracy: CG reaches the dense solution; errors are finite and non-increasing for CG.
    acc = saved["accuracy"]
    cg = acc["relative_error"]["CG"]
    assert len(cg) == len(acc["iterations"]) == len(settings.mlp_iterations)
    assert cg[-1] < cg[0]
    assert all(math.isfinite(e) for errors in acc["relative_error"].values() for e in errors)
    assert results["targets"] and all("measured" in t for t in results["targets"])


def test_memory_worker_structure(one_thread):
    spec = {"arch": "tiny-cnn", "batch": 2, "image": 8, "mu": 1000.0, "device": "cpu",
            "variant": "upper step, kept graph", "threads": 1}
    out = memory_worker(spec)
    assert out["variant"] == spec["variant"]
    assert math.isfinite(out["delta_mib"]) and out["baseline_mib"] > 0


def test_sync_batchnorm_benchmark_smoke(tmp_path):
    from benchmarks import sync_batchnorm

    result = sync_batchnorm.main(["--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert set(result["ratios"]) == {"gradient", "graph build", "HVP"}
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())
    assert json.loads((tmp_path / "sync_batchnorm-cpu.json").read_text()) == result
    assert "| HVP |" in (tmp_path / "sync_batchnorm-cpu.md").read_text()

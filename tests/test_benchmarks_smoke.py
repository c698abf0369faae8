"""Smoke test of ``benchmarks/``: every measurement on toy sizes, the files it writes, and the
agreement of the peers' implicit-Jacobian solutions with ours."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.measure import memory_worker
from benchmarks.run import Settings, render_markdown, run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``benchmarks/run.py`` at its smoke size, run once for the tests below."""
    return _run_once(tmp_path_factory.mktemp("smoke"), run, Settings.for_mode("smoke", "cpu"),
                     "smoke-cpu.json")


def _run_once(tmp_path, run_fn, settings, json_name):
    """A benchmark at its smoke size on one intra-op thread: the folder, the settings, what it
    returned and the JSON it wrote."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_fn("smoke", "cpu", str(tmp_path), "pytest smoke", log=lambda *_: None,
                         settings=settings)
    finally:
        torch.set_num_threads(before)
    return tmp_path, settings, results, json.loads((tmp_path / json_name).read_text())


def _require_peer(saved: dict, peer: str) -> None:
    """Skip (not pass) a peer's agreement test when the peer is not installed."""
    if not saved["peer_status"][peer]["available"]:
        pytest.skip(f"{peer} is not installed (pip install -e '.[bench]')")


def test_benchmarks_smoke(smoke):
    tmp_path, settings, results, saved = smoke

    # Files: JSON (round-trips), Markdown (the tables), the accuracy plot.
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

    # Accuracy: CG reaches the dense solution; errors are finite and non-increasing for CG.
    acc = saved["accuracy"]
    cg = acc["relative_error"]["CG"]
    assert len(cg) == len(acc["iterations"]) == len(settings.mlp_iterations)
    assert cg[-1] < cg[0]
    assert all(math.isfinite(e) for errors in acc["relative_error"].values() for e in errors)
    assert results["targets"] and all("measured" in t for t in results["targets"])


def test_torchopt_solves_the_same_system(smoke):
    saved = smoke[3]
    _require_peer(saved, "torchopt")
    peers = saved["peers"]["peers"]
    assert peers["TorchOpt custom_root + solve_cg"]["rel_diff_u"] < 1e-5
    assert peers["TorchOpt custom_root + solve_cg"]["rel_diff_hypergradient"] < 1e-5
    assert peers["TorchOpt custom_root default (solve_normal_cg)"]["rel_diff_u"] < 1e-3


def test_betty_solves_the_same_system(smoke):
    saved = smoke[3]
    _require_peer(saved, "betty")
    peers = saved["peers"]["peers"]
    assert peers["Betty neumann"]["compared_with"] == "ours Neumann"
    assert peers["Betty neumann"]["rel_diff_u"] < 1e-5


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


@pytest.fixture(scope="module")
def robust_smoke(tmp_path_factory):
    """``benchmarks/robust_ij.py`` at its smoke size, run once for the tests below."""
    from benchmarks.robust_ij import Settings as RobustSettings
    from benchmarks.robust_ij import run as run_robust

    return _run_once(tmp_path_factory.mktemp("robust"), run_robust,
                     RobustSettings.for_mode("smoke", "cpu"), "robust_ij-cpu.json")


def test_robust_ij_smoke(robust_smoke):
    """The robust-IJ benchmark on tiny random networks: files, structure, robust solvers."""
    from benchmarks.robust_ij import FAMILIES, render_markdown

    tmp_path, settings, results, saved = robust_smoke
    assert {"machine", "settings", "networks", "systems", "targets", "peer_status"} <= saved.keys()
    assert (tmp_path / "robust_ij-cpu.md").read_text() == render_markdown(saved)
    assert (tmp_path / "robust_ij_accuracy_vs_cost.png").stat().st_size > 1000
    assert len(saved["systems"]) == 2 * len(settings.dampings)

    for system in saved["systems"]:
        assert "error" not in system
        ref = system["reference"]
        assert ref["converged"] and ref["relative_residual_max"] < 1e-6
        rows = {(r["family"], r["value"]): r for r in system["rows"]}
        # Every method appears at every point of its sweep, measured or with its reason.
        for fam in FAMILIES:
            values = (settings.peer_products if fam.curvature == "peer" else
                      settings.ranks if fam.sweep == "k" else settings.products)
            for value in values:
                row = rows[(fam.key, value)]
                if row["error"] is None:
                    cost = row["cost_over_gradient"]
                    assert math.isfinite(cost) and cost > 0
                    assert len(row["solves"]) == settings.upper_steps
                    assert row["rel_error_median"] >= 0 and row["rel_residual_median"] >= 0
        # Robust configurations never break down on these systems.
        for r in system["rows"]:
            if r["robust"]:
                assert r["error"] is None and r["breakdowns"] == 0, r
    assert [t["target"] for t in results["targets"]][-1] == "b"
    assert results["targets"][-1]["met"]


def test_torchopt_cg_matches_ours_on_the_robust_systems(robust_smoke):
    """TorchOpt's solve_cg is CG: the same solution as ours at the same N_c (solves that do not
    stop early), so the same error against u*."""
    _, settings, _, saved = robust_smoke
    _require_peer(saved, "torchopt")
    compared = 0
    for system in saved["systems"]:
        if system["mu"] > 100:
            rows = {(r["family"], r["value"]): r for r in system["rows"]}
            n = settings.peer_products[0]
            ours, theirs = rows[("cg", n)], rows[("torchopt-cg", n)]
            assert theirs["rel_error_median"] == pytest.approx(ours["rel_error_median"],
                                                               rel=1e-2, abs=1e-6)
            compared += 1
    assert compared


def test_robust_ij_memory_worker(one_thread):
    from dataclasses import asdict

    from benchmarks.robust_ij import Settings, memory_worker
    from benchmarks.toy_networks import toy_networks

    settings = Settings.for_mode("smoke", "cpu")
    spec = {"device": "cpu", "settings": asdict(settings), "network": toy_networks()[1].name,
            "mu": 10.001, "variants": ["fine-tuning step", "gn-cg", "reference"], "threads": 1}
    out = memory_worker(spec)
    assert set(out["variants"]) == {"fine-tuning step", "gn-cg", "reference",
                                    "fine-tuning step (again, check)"}
    assert all(math.isfinite(v["delta_mib"]) and v["delta_mib"] >= 0
               for v in out["variants"].values())


def test_external_benchmark_smoke(tmp_path, one_thread):
    """External problems at tiny size: the library's Dense and converged CG hypergradients equal
    the closed-form float64 reference; a peer's CG is the same algorithm as ours."""
    from benchmarks.external import Settings, render_markdown
    from benchmarks.external import run as run_external

    settings = Settings.tiny()
    run_external(settings, str(tmp_path), "pytest smoke", log=lambda *_: None)
    saved = json.loads((tmp_path / "external-cpu.json").read_text())
    assert (tmp_path / "external-cpu.md").read_text() == render_markdown(saved)
    assert (tmp_path / "external-cpu.png").stat().st_size > 1000
    assert set(saved["problems"]) == {"quadratic", "logreg"}
    n_c = str(settings.iterations[0])
    for problem in saved["problems"].values():
        assert problem["exact"]["Dense"] < 1e-10
        assert problem["exact"]["CG converged"] < 1e-10
        rows = problem["methods"]
        assert rows["Dense"]["points"][n_c]["relative_error"] < 1e-10
        for label, row in rows.items():
            point = row["points"][n_c]
            assert "error" not in point, (label, point)
            assert math.isfinite(point["relative_error"]) and point["seconds"] > 0
        ours = rows["CG"]["points"][n_c]["relative_error"]
        assert 0 < ours < 1  # two iterations: better than nothing, not converged
        for peer in ("TorchOpt custom_root + solve_cg", "JAXopt custom_root + solve_cg (jit)"):
            if peer in rows:
                assert rows[peer]["points"][n_c]["relative_error"] == pytest.approx(ours,
                                                                                    rel=1e-8)
        if "Betty neumann (alpha = 1/lambda_max)" in rows:
            theirs = rows["Betty neumann (alpha = 1/lambda_max)"]["points"][n_c]
            assert theirs["relative_error"] == pytest.approx(
                rows["Neumann (alpha = 1/lambda_max)"]["points"][n_c]["relative_error"], rel=1e-8)

"""Both recipes take the recycled and Lanczos IJ solvers (``bissl.ij=recycled-*|lanczos*``): the
configs load with their settings and bounds, the builder makes the named solver, a tiny BiSSL
stage of each recipe runs with them, the recycle space lives for one alternation, and a killed
and resumed stage repeats the uninterrupted one."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from implicitbilevel import (
    CG,
    MINRES,
    LanczosDeflation,
    LanczosPreconditioner,
    LanczosSolver,
    RecycledCG,
    RecycledMINRES,
)
from recipes.common import ConfigError, load_config
from recipes.common import ij as ij_module
from recipes.nlp.config import RecipeConfig
from recipes.vision.config import VisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_stages  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
NEW = ("recycled-cg", "recycled-minres", "lanczos-pcg", "lanczos-minres", "lanczos")

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")


@pytest.mark.parametrize("config, cls", [("vision_embedded.yaml", VisionConfig),
                                         ("gpt_glue_embedded.yaml", RecipeConfig)])
@pytest.mark.parametrize("name", NEW)
def test_both_recipes_load_the_new_solver_names(config, cls, name):
    cfg = load_config(CONFIGS / config, cls, [f"bissl.ij={name}", "bissl.recycle_dim=4",
                                              "bissl.lanczos_rank=3", "bissl.ij_tol=0.01"])
    s = cfg.bissl
    assert (s.ij, s.recycle_dim, s.lanczos_rank, s.ij_tol) == (name, 4, 3, 0.01)
    solver = ij_module.build_solver(s)
    expected = {"recycled-cg": RecycledCG, "recycled-minres": RecycledMINRES, "lanczos-pcg": CG,
                "lanczos-minres": MINRES, "lanczos": LanczosSolver}[name]
    assert type(solver) is expected
    if name.startswith("recycled"):
        assert (solver.recycle_dim, solver.window, solver.tol) == (4, 20, 0.01)
    elif name == "lanczos":
        assert (solver.rank, solver.products) == (3, None)
    else:
        assert isinstance(solver.preconditioner, LanczosPreconditioner)
        assert solver.preconditioner.rank == 3 and solver.tol == 0.01


@pytest.mark.parametrize("bad", ["bissl.recycle_dim=0", "bissl.recycle_dim=257",
                                 "bissl.recycle_window=0", "bissl.lanczos_rank=0",
                                 "bissl.lanczos_products=-1", "bissl.ij_tol=1.0",
                                 "bissl.ij_tol=-0.1", "bissl.ij=recycled"])
def test_out_of_bounds_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        load_config(CONFIGS / "vision_embedded.yaml", VisionConfig, [bad])


def test_inconsistent_settings_are_refused_with_what_to_do():
    base = load_config(CONFIGS / "vision_embedded.yaml", VisionConfig).bissl
    too_few = dataclasses.replace(base, ij="lanczos-minres", lanczos_rank=8,
                                  lanczos_products=4)
    with pytest.raises(ValueError, match="lanczos_products = 4 is below.*lanczos_rank = 8"):
        ij_module.build_solver(too_few)
    seeded = dataclasses.replace(base, ij="cg", recycle_lanczos=True)
    with pytest.raises(ValueError, match="recycle_lanczos applies to recycled-cg"):
        ij_module.build_solver(seeded)
    deflated = ij_module.build_solver(dataclasses.replace(base, ij="recycled-minres",
                                                          recycle_lanczos=True))
    assert isinstance(deflated.deflation, LanczosDeflation)
    concat = dataclasses.replace(base, **{"ij": "lanczos-minres", "solve_over": "all",
                                          "head_damping": 1.0, "curvature": "hessian"})
    with pytest.raises(ValueError, match="solve_over=coupled"):
        ij_module.implicit_jacobian(concat, None)


@pytest.fixture
def built(monkeypatch):
    """The solvers ``build_solver`` made during a test."""
    made = []
    original = ij_module.build_solver

    def recording(s):
        made.append(original(s))
        return made[-1]

    monkeypatch.setattr(ij_module, "build_solver", recording)
    return made


@pytest.mark.parametrize("stage, name, curvature", [
    ("vision", "recycled-cg", "gauss-newton"), ("vision", "recycled-minres", "hessian"),
    ("vision", "lanczos-pcg", "gauss-newton"), ("vision", "lanczos-minres", "hessian"),
    ("vision", "lanczos", "gauss-newton"), ("gpt", "recycled-minres", "hessian"),
    ("gpt", "recycled-cg", "gauss-newton"), ("gpt", "lanczos", "gauss-newton")])
def test_a_tiny_stage_runs_and_recycles_within_each_alternation(stage, name, curvature, built):
    run = tiny_stages.vision_stage if stage == "vision" else tiny_stages.gpt_stage
    settings = dict(ij=name, curvature=curvature, upper_steps=3, cg_iters=4, recycle_dim=3,
                    recycle_window=4, lanczos_rank=3, lanczos_products=6)
    if stage == "gpt" and name == "lanczos":
        settings["damping"] = 1000.0  # the tiny GPT's Gauss-Newton pivot is small at μ = 10
    history = run(**settings)
    assert [h["alternation"] for h in history] == [0, 1]
    assert all(torch.isfinite(torch.tensor(h["upper_grad_norm"])) for h in history)
    solver = built[-1]
    if name.startswith("recycled"):
        stats = solver.last_stats
        # three solves per alternation on one operator: the third is deflated by what the first
        # two found, and the count restarts with each alternation's new operator
        assert stats.solve_index == 2 and stats.deflated > 0
    if name.startswith("lanczos"):
        # the Lanczos build (6 products) is spent once per alternation, on the curvature's count
        products = [h["hessian_products"] for h in history]
        solves = [h["solver_iterations"] for h in history]
        assert all(p >= 6 + s for p, s in zip(products, solves)), (products, solves)


def test_lanczos_refuses_an_indefinite_system_in_the_recipe_naming_lambda_min():
    with pytest.raises(ValueError, match=r"λ_min = -.*1 \+ λ_min/μ"):
        tiny_stages.vision_stage(ij="lanczos", curvature="hessian", lanczos_rank=3,
                                 lanczos_products=6)


@pytest.mark.parametrize("ij, curvature", [("recycled-minres", "hessian"),
                                           ("recycled-cg", "gauss-newton")])  # embedded default
def test_a_killed_and_resumed_recycled_stage_equals_the_uninterrupted_run(
        ij, curvature, tmp_path, monkeypatch, kill_bissl_at):
    original = tiny_stages.run_bissl
    place = {}

    def with_checkpoints(*args, **kwargs):
        return original(*args, out_dir=place["dir"], resume=place.get("resume", False), **kwargs)

    monkeypatch.setattr(tiny_stages, "run_bissl", with_checkpoints)
    # 6 lower batches at 3 per alternation and 4 upper batches at 2: both data passes wrap at
    # alternation 2, and the kill comes after that, at alternation 3.
    settings = dict(ij=ij, curvature=curvature, alternations=4, lower_steps=2, upper_steps=2,
                    cg_iters=4, recycle_dim=3, recycle_window=4, checkpoint_every=1)
    place["dir"] = tmp_path / "whole"
    whole = tiny_stages.vision_stage(**settings)
    place["dir"] = tmp_path / "killed"
    revive = kill_bissl_at("_lower_stage", 3)
    with pytest.raises(KeyboardInterrupt):
        tiny_stages.vision_stage(**settings)
    revive()
    place["resume"] = True
    resumed = tiny_stages.vision_stage(**settings)
    assert len(resumed) == len(whole) == 4
    for a, b in zip(whole, resumed):
        for key in ("upper_loss", "lower_loss", "ij_relative_residual", "solver_iterations",
                    "hessian_products", "upper_grad_norm"):
            assert a[key] == b[key], (a["alternation"], key)
    final = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    again = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert "ij" not in final  # the recycle space is per alternation: nothing to checkpoint
    for module, state in final["modules"].items():  # parameters and BatchNorm statistics
        for name, tensor in state.items():
            assert torch.equal(again["modules"][module][name], tensor), (module, name)

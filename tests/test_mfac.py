"""Tests of :mod:`implicitbilevel.solvers.mfac` (M-FAC, thesis Sec. 9.1) against dense float64
solves.

- The solve equals the dense ``(D + GᵀG/(kμ))⁻¹ v`` for several window sizes ``m``, fewer
  gradients than ``m``, windows that slid past ``m`` several times, damping values ``μ`` from
  0.01 to 100, and a per-name ``D`` (identity and a head ridge).
- The dynamic (sliding) updates equal a from-scratch computation: the kept inner products equal
  those recomputed from the gradients, the solution equals a fresh window fed only the last ``m``
  gradients and a dense inverse built by ``k`` Sherman-Morrison rank-one updates (the paper's
  recursion).
- No gradient: ``u = D⁻¹ v``; the measured residual is that of the dense Hessian system.
- Checkpoints restore the window exactly; refusals name what is wrong.
- The BiSSL trainer feeds it the pretext gradient ``∇L^P`` (without the proximal term) of every
  lower step, takes no Hessian products, and resumes with the window bit-identical.
- Both recipes' BiSSL stages run with ``bissl.ij=mfac`` on tiny embedded settings.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from implicitbilevel import MFAC, BilevelProblem, GradientWindow, ImplicitJacobian, ProximalL2
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss
from implicitbilevel.implicit_jacobian import IJSystem
from implicitbilevel.tree import tree_flatten, tree_unflatten

D64 = torch.float64
SHAPES = {"weight": (2, 5), "bias": (3,), "conv": (2, 2, 2)}  # 21 unknowns
N = 21


class DenseCurvature:
    """``z ↦ H z`` for a dense symmetric ``H`` over a parameter dict (the curvature protocol)."""

    def __init__(self, h: torch.Tensor):
        self.h = h
        self.params = {n: torch.zeros(s, dtype=D64) for n, s in SHAPES.items()}
        self.names = list(self.params)
        self.memo: dict = {}

    def __call__(self, t):
        return tree_unflatten(self.h @ tree_flatten({n: t[n] for n in self.names}), self.params)


def system(mu: float, h: torch.Tensor | None = None, ridge: float = 0.0) -> IJSystem:
    """``A = D + H/μ``; with ``ridge`` the name "conv" is a head block with ``D = ridge``."""
    curv = DenseCurvature(torch.zeros(N, N, dtype=D64) if h is None else h)
    identity = ["weight", "bias"] if ridge else list(SHAPES)
    return IJSystem(curv, mu, identity=identity, ridge=ridge,
                    ridge_names=["conv"] if ridge else ())


def gradients(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [tree_unflatten(torch.randn(N, generator=g, dtype=D64) * (1 + i % 3),
                           {n: torch.zeros(s) for n, s in SHAPES.items()}) for i in range(count)]


def dense_solution(grads, v, mu, ridge=0.0):
    """``(D + GᵀG/(kμ))⁻¹ v`` by ``torch.linalg.solve`` (``D`` = 1, or ``ridge`` on "conv")."""
    d = torch.ones(N, dtype=D64)
    if ridge:
        d[-8:] = ridge  # "conv" is the last block
    a = torch.diag(d)
    if grads:
        g = torch.stack([tree_flatten(x) for x in grads])
        a = a + g.T @ g / (len(grads) * mu)
    return torch.linalg.solve(a, tree_flatten(v))


def rhs(seed: int = 99):
    return gradients(1, seed)[0]


@pytest.mark.parametrize("m", [1, 3, 7])
@pytest.mark.parametrize("observed", ["fewer", "full", "slid"])
@pytest.mark.parametrize("mu", [0.01, 1.0, 100.0])
def test_solve_matches_dense_inverse_of_recent_gradients(m, observed, mu):
    count = {"fewer": max(m - 1, 1), "full": m, "slid": 2 * m + 3}[observed]
    grads = gradients(count, seed=m)
    solver = MFAC(m=m)
    for x in grads:
        solver.observe(x)
    v = rhs()
    u, info = solver(system(mu), v)
    expected = dense_solution(grads[-m:], v, mu)
    assert torch.allclose(tree_flatten(u), expected, rtol=1e-10, atol=1e-12)
    assert solver.window.count == min(count, m)
    assert info.iterations == 0 and math.isnan(info.residual_norm) and info.breakdown is None


@pytest.mark.parametrize("ridge", [0.1, 5.0])
def test_solve_with_a_head_ridge_matches_dense(ridge):
    grads = gradients(6, seed=3)
    solver = MFAC(m=4)
    for x in grads:
        solver.observe(x)
    v = rhs()
    u, _ = solver(system(2.0, ridge=ridge), v)
    assert torch.allclose(tree_flatten(u), dense_solution(grads[-4:], v, 2.0, ridge), rtol=1e-10)


def test_sliding_updates_equal_a_from_scratch_window_and_sherman_morrison():
    m, mu = 5, 0.3
    grads = gradients(3 * m + 2, seed=7)
    sliding = MFAC(m=m)
    for x in grads:
        sliding.observe(x)
    w = sliding.window
    # The kept inner products equal those recomputed from the stored gradients.
    for n in SHAPES:
        flat = w.buffer[n].reshape(m, -1)
        assert torch.allclose(w.gram[n], flat @ flat.T, rtol=1e-13, atol=1e-13)
    fresh = MFAC(m=m)
    for x in reversed(grads[-m:]):  # the order of the window does not matter
        fresh.observe(x)
    v = rhs()
    u_sliding, _ = sliding(system(mu), v)
    u_fresh, _ = fresh(system(mu), v)
    assert torch.allclose(tree_flatten(u_sliding), tree_flatten(u_fresh), rtol=1e-11)
    # M-FAC's recursion: k Sherman-Morrison rank-one updates of D⁻¹ = I, with F̂ = Σ g gᵀ/(kμ)·μ.
    inv = torch.eye(N, dtype=D64)
    for x in grads[-m:]:
        g = tree_flatten(x) / math.sqrt(m * mu)
        ig = inv @ g
        inv = inv - torch.outer(ig, ig) / (1 + g @ ig)
    assert torch.allclose(tree_flatten(u_sliding), inv @ tree_flatten(v), rtol=1e-10)


def test_no_gradient_gives_inverse_damping_and_measured_residual_is_the_hessian_systems():
    v = rhs()
    u, info = MFAC()(system(1.0, ridge=4.0), v)
    expected = tree_flatten(v).clone()
    expected[-8:] /= 4.0
    assert torch.allclose(tree_flatten(u), expected) and info.iterations == 0
    g = torch.Generator().manual_seed(1)
    b = torch.randn(N, N, generator=g, dtype=D64)
    h = b @ b.T
    solver = MFAC(m=3, measure_residual=True)
    for x in gradients(4, seed=2):
        solver.observe(x)
    u, info = solver(system(2.0, h), v)
    a = torch.eye(N, dtype=D64) + h / 2.0
    true = float(torch.linalg.norm(tree_flatten(v) - a @ tree_flatten(u)))
    assert info.iterations == 1 and info.residual_norm == pytest.approx(true, rel=1e-12)
    assert not info.converged


def test_state_dict_restores_the_window_exactly():
    grads = gradients(9, seed=5)
    a, b = MFAC(m=4), MFAC(m=4)
    for x in grads[:6]:
        a.observe(x)
    b.load_state_dict(a.state_dict())
    for x in grads[6:]:
        a.observe(x)
        b.observe(x)
    v = rhs()
    assert torch.equal(tree_flatten(a(system(1.0), v)[0]), tree_flatten(b(system(1.0), v)[0]))
    with pytest.raises(ValueError, match="m = 4"):
        MFAC(m=3).load_state_dict(a.state_dict())


def test_refusals_name_the_problem():
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="m"):
            MFAC(m=bad)
    solver = MFAC(m=2)
    solver.observe(gradients(1, 0)[0])
    with pytest.raises(ValueError, match="names"):
        solver.observe({"weight": torch.zeros(2, 5, dtype=D64)})
    with pytest.raises(ValueError, match="shape"):
        solver.observe({**gradients(1, 0)[0], "bias": torch.zeros(4, dtype=D64)})
    with pytest.raises(ValueError, match="non-finite"):
        solver.observe({**gradients(1, 0)[0], "bias": torch.full((3,), math.nan, dtype=D64)})
    with pytest.raises(ValueError, match="identity block"):
        solver(lambda z: z, rhs())
    head_without_ridge = IJSystem(DenseCurvature(torch.zeros(N, N, dtype=D64)), 1.0,
                                  identity=["weight", "bias"])
    with pytest.raises(ValueError, match="head_damping"):
        solver(head_without_ridge, rhs())
    with pytest.raises(ValueError, match="names"):
        solver(system(1.0), {"weight": torch.zeros(2, 5, dtype=D64)})
    with pytest.raises(ValueError, match="m"):
        GradientWindow(0)


# -- the BiSSL trainer ---------------------------------------------------------------------------


class _Recorder(torch.optim.SGD):
    """SGD that records its parameters before every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.points: list[torch.Tensor] = []

    def step(self, closure=None):
        self.points.append(self.param_groups[0]["params"][0].detach().clone())
        return super().step(closure)


def _trainer(out_dir=None, alternations=3, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 3
    mat = torch.randn(n, n, generator=g, dtype=D64)
    q = mat @ mat.T / n + 0.5 * torch.eye(n, dtype=D64)
    c = torch.randn(n, generator=g, dtype=D64)
    b_mat = torch.randn(k, n, generator=g, dtype=D64)
    target = torch.randn(k, generator=g, dtype=D64)

    def pretext(p, batch):
        (x,) = batch
        return 0.5 * p["th"] @ q @ p["th"] + (c + x.mean(0)) @ p["th"]

    def downstream(p, batch):
        (x,) = batch
        return 0.5 * ((b_mat @ p["th"] + p["bias"] - target - x.mean()) ** 2).sum()

    theta0 = torch.randn(n, generator=g, dtype=D64)
    upper = {"th": theta0.clone().requires_grad_(),
             "bias": torch.zeros(k, dtype=D64).requires_grad_()}
    lower = {"th": theta0.clone().requires_grad_()}
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=0.5,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(MFAC(m=m), damping=1.0, reuse_graph=False))
    data = TensorDataset(torch.randn(8, n, generator=g, dtype=D64))
    lower_opt = _Recorder(list(lower.values()), lr=0.1)
    trainer = BiSSLTrainer(
        problem, upper, lower, torch.optim.SGD(list(upper.values()), lr=0.05), lower_opt,
        DataLoader(data, batch_size=2), DataLoader(data, batch_size=2),
        BiSSLConfig(alternations=alternations, lower_steps=2, upper_steps=2, grad_clip=None,
                    progress=False, measure_residual=False), out_dir=out_dir)
    return trainer, problem, lower_opt, (q, c)


def test_trainer_feeds_the_pretext_gradient_of_every_lower_step():
    trainer, problem, lower_opt, (q, c) = _trainer(m=3)
    batches = []
    original = problem.lower_grad

    def recording(upper, lower, batch, t=0):
        batches.append(batch[0].mean(0))
        return original(upper, lower, batch, t=t)

    problem.lower_grad = recording
    history = trainer.run()
    window = problem.solver.window
    assert window.count == 3 and len(lower_opt.points) == 6
    # The last three lower steps' ∇L^P = Q θ + c + mean(x), at the point before each step.
    expected = [q @ th + c + x for th, x in zip(lower_opt.points, batches)][-3:]
    slots = [(window.position + i) % 3 for i in range(3)]  # oldest first
    for slot, e in zip(slots, expected):
        assert torch.allclose(window.buffer["th"][slot], e, rtol=1e-12)
    assert all(h["hessian_products"] == 0 and h["solver_iterations"] == 0 for h in history)


def test_trainer_resume_restores_the_window_bit_identical(tmp_path):
    full, full_problem, _, _ = _trainer(tmp_path / "full", alternations=4)
    full.run()
    cut, _, _, _ = _trainer(tmp_path / "cut", alternations=2)
    cut.run()
    resumed, resumed_problem, _, _ = _trainer(tmp_path / "cut", alternations=4)
    resumed.run(resume=True, allow_changed_config=True)  # the cut run stopped by T = 2
    a, b = full_problem.solver.window, resumed_problem.solver.window
    assert a.count == b.count == 3 and a.position == b.position
    assert torch.equal(a.buffer["th"], b.buffer["th"]) and torch.equal(a.gram["th"], b.gram["th"])
    for name in full.upper_params:
        assert torch.equal(full.upper_params[name], resumed.upper_params[name])


# -- the recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["vision", "gpt"])
def test_each_recipes_bissl_stage_runs_with_mfac(recipe):
    from tiny_stages import gpt_stage, vision_stage

    stage = vision_stage if recipe == "vision" else gpt_stage
    history = stage(ij="mfac", mfac_m=3)
    assert len(history) == 2
    assert all(math.isfinite(h["upper_loss"]) and h["solver_iterations"] == 0 for h in history)
    # No products but the one that measures the logged residual against the Hessian system.
    assert all(h["hessian_products"] == 1 and math.isfinite(h["ij_relative_residual"])
               for h in history)

"""The implicit Jacobian over a named subset (thesis Sec. 9.1; implicitbilevel.subset) on a small
BatchNorm conv net in float64, against the dense block formula: with the curvature outside the
BatchNorm affine parameters ``S`` taken as zero,

    u_S = (I + H_SS/μ)⁻¹ v_S,   u_O = v_O ("identity") or 0 ("zero"),   dF/dθ_D = ∇_θD f + u,

with ``H`` the full pretext Hessian from ``torch.autograd.functional.hessian`` (BatchNorm on batch
statistics), masked to its ``S × S`` block."""

import math
import re

import pytest
import torch
from torch import nn

from implicitbilevel import (
    CG,
    MINRES,
    BilevelProblem,
    Dense,
    ImplicitJacobian,
    ProximalL2,
    Regularizer,
    functional_module,
)
from implicitbilevel.bissl import bissl_upper_loss


class Net(nn.Module):
    """Two tanh conv layers with BatchNorm (the backbone) and a linear head."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(),
            nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(3, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _setup(seed: int = 0):
    gen = torch.manual_seed(seed)  # the same nets in every test (the Hessian is cached)
    pretext, downstream = Net(4).double(), Net(2).double()
    downstream.backbone.load_state_dict(pretext.backbone.state_dict())
    with torch.no_grad():  # θ_P ≠ θ_D, and BatchNorm affine parameters away from (1, 0)
        for p in pretext.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x_low = torch.randn(12, 2, 6, 6, generator=gen, dtype=torch.float64)
    y_low = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    x_up = torch.randn(10, 2, 6, 6, generator=gen, dtype=torch.float64)
    y_up = torch.randint(0, 2, (10,), generator=gen)
    pre_fn, down_fn = functional_module(pretext), functional_module(downstream)

    def lower_loss(params, batch):  # a smooth pretext loss (softplus of a regression error)
        x, y = batch
        return nn.functional.softplus(pre_fn(params, x) - y).pow(2).mean()

    def downstream_loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(down_fn(params, x), y)

    backbone = [n for n, _ in downstream.named_parameters() if n.startswith("backbone.")]
    upper = {n: p.detach().clone() for n, p in downstream.named_parameters()}
    lower = {n: p.detach().clone() for n, p in pretext.named_parameters()}
    return dict(pretext=pretext, backbone=backbone, upper=upper, lower=lower,
                lower_loss=lower_loss, upper_loss=bissl_upper_loss(downstream_loss, backbone),
                lower_batch=(x_low, y_low), upper_batch=(x_up, y_up))


def _bn_names(module: nn.Module, among: list[str]) -> list[str]:
    names = {f"{m}.{p}" for m, sub in module.named_modules()
             if isinstance(sub, nn.modules.batchnorm._NormBase) for p, _ in sub.named_parameters()}
    return [n for n in among if n in names]


_HESSIANS: dict = {}


def _full_hessian(s, backbone, sizes, shapes, flat0):
    """The pretext Hessian over the whole backbone (cached: the same for every test here)."""
    if "H" not in _HESSIANS:
        lower = s["lower"]
        frozen = functional_module(s["pretext"], freeze_buffers=True)

        def ell(flat):
            params = dict(lower)
            params.update({n: t.reshape(sh) for n, t, sh in
                           zip(backbone, torch.split(flat, sizes), shapes)})
            x, y = s["lower_batch"]
            return nn.functional.softplus(frozen(params, x) - y).pow(2).mean()

        _HESSIANS["H"] = torch.autograd.functional.hessian(ell, flat0, vectorize=True)
    return _HESSIANS["H"]


def _dense_reference(s, subset: list[str], mu: float, outside: str):
    """The block formula with dense float64 linear algebra, from first principles."""
    backbone, lower = s["backbone"], s["lower"]
    shapes = [lower[n].shape for n in backbone]
    sizes = [lower[n].numel() for n in backbone]
    flat0 = torch.cat([lower[n].reshape(-1) for n in backbone])
    hess = _full_hessian(s, backbone, sizes, shapes, flat0)
    in_s = torch.cat([torch.full((k,), n in subset) for n, k in zip(backbone, sizes)])
    # v = ∇_θP f and ∇_θD f by plain autograd
    up = {n: p.clone().requires_grad_(True) for n, p in s["upper"].items()}
    low = {n: p.clone().requires_grad_(True) for n, p in lower.items()}
    f = s["upper_loss"](up, low, s["upper_batch"])
    grads = torch.autograd.grad(f, [*up.values(), *[low[n] for n in backbone]])
    grad_x = dict(zip(up, grads[:len(up)]))
    v = torch.cat([g.reshape(-1) for g in grads[len(up):]])
    u = torch.zeros_like(v) if outside == "zero" else v.clone()
    block = torch.eye(int(in_s.sum()), dtype=v.dtype) + hess[in_s][:, in_s] / mu
    u[in_s] = torch.linalg.solve(block, v[in_s])
    expected = dict(grad_x)
    for n, piece, sh in zip(backbone, torch.split(u, sizes), shapes):
        expected[n] = grad_x[n] + piece.reshape(sh)  # the proximal mixed term is −(−u)
    return expected, block


def _problem(s, subset, outside, solver, damping):
    return BilevelProblem(s["upper_loss"], s["lower_loss"], lam=0.5,
                          regularizer=ProximalL2(s["backbone"]),
                          ij=ImplicitJacobian(solver, damping=damping, subset=subset,
                                              outside=outside))


@pytest.mark.parametrize("outside", ["identity", "zero"])
@pytest.mark.parametrize("solver", ["cg", "minres", "dense"])
def test_subset_hypergradient_matches_the_dense_block_formula(outside, solver):
    s = _setup()
    subset = _bn_names(s["pretext"], s["backbone"])
    assert 0 < len(subset) < len(s["backbone"])
    damping = 10.0
    ij = {"cg": CG(max_iter=30, tol=1e-12), "minres": MINRES(max_iter=30, tol=1e-12),
          "dense": Dense()}[solver]
    problem = _problem(s, subset, outside, ij, damping)
    hessian = problem.lower_hessian(s["upper"], s["lower"], s["lower_batch"])
    assert hessian.names == subset  # the solve touches only the subset's Hessian block
    out = problem.upper_grad(s["upper"], s["lower"], s["upper_batch"], lower_hessian=hessian)
    expected, block = _dense_reference(s, subset, 0.5 + damping, outside)
    assert torch.linalg.eigvalsh(block).min() > 0  # CG's assumption holds here
    assert out.info.converged and sorted(out.u) == sorted(subset)
    for n, g in expected.items():
        torch.testing.assert_close(out.grads[n], g, rtol=1e-9, atol=1e-11)
    assert out.true_relative_residual() < 1e-10


def test_minres_solves_an_indefinite_subset_block():
    """The hard case: at small μ the block ``I + H_SS/μ`` is indefinite; MINRES still matches."""
    s = _setup()
    subset = _bn_names(s["pretext"], s["backbone"])
    lam = 0.004
    problem = BilevelProblem(s["upper_loss"], s["lower_loss"], lam=lam,
                             regularizer=ProximalL2(s["backbone"]),
                             ij=ImplicitJacobian(MINRES(max_iter=40, tol=1e-12),
                                                 subset=lambda n: n in subset))
    expected, block = _dense_reference(s, subset, lam, "identity")
    assert torch.linalg.eigvalsh(block).min() < 0, "the test needs an indefinite block"
    out = problem.upper_grad(s["upper"], s["lower"], s["upper_batch"], s["lower_batch"])
    for n, g in expected.items():
        torch.testing.assert_close(out.grads[n], g, rtol=1e-8, atol=1e-10)


def test_a_regex_predicate_selects_the_subset_and_a_full_subset_is_the_full_ij():
    s = _setup()
    full = BilevelProblem(s["upper_loss"], s["lower_loss"], lam=0.5,
                          regularizer=ProximalL2(s["backbone"]),
                          ij=ImplicitJacobian(CG(max_iter=4), damping=10.0))
    every = _problem(s, re.compile(r"^backbone\.").search, "zero", CG(max_iter=4), 10.0)
    a = full.upper_grad(s["upper"], s["lower"], s["upper_batch"], s["lower_batch"])
    b = every.upper_grad(s["upper"], s["lower"], s["upper_batch"], s["lower_batch"])
    for n in a.grads:  # the same operator and iterations: the same numbers
        torch.testing.assert_close(a.grads[n], b.grads[n], rtol=1e-12, atol=1e-14)


def test_bad_subsets_fail_early_with_the_option_named():
    s = _setup()
    with pytest.raises(TypeError, match="ij_subset"):
        _problem(s, "backbone.1", "identity", Dense(), 10.0)
    with pytest.raises(ValueError, match="outside must be 'identity' or 'zero'"):
        _problem(s, ["backbone.1.weight"], "both", Dense(), 10.0)
    with pytest.raises(ValueError, match=r"ImplicitJacobian\(outside='zero'\)"):
        BilevelProblem(s["upper_loss"], s["lower_loss"], lam=0.5,
                       ij=ImplicitJacobian(subset=["backbone.1.weight"]),
                       regularizer=Regularizer(lambda x, y: sum((y[n] ** 2).sum() for n in y)))
    problem = _problem(s, ["backbone.9.weight"], "identity", Dense(), 10.0)
    with pytest.raises(KeyError, match="ij_subset"):
        problem.lower_hessian(s["upper"], s["lower"], s["lower_batch"])
    problem = _problem(s, lambda n: n.startswith("nothing"), "identity", Dense(), 10.0)
    with pytest.raises(ValueError, match="selects none"):
        problem.lower_hessian(s["upper"], s["lower"], s["lower_batch"])


@pytest.mark.parametrize("recipe, spec", [("vision", "batchnorm"), ("gpt", "layernorm")])
def test_each_recipe_bissl_stage_runs_on_its_norm_subset(recipe, spec):
    from tiny_stages import gpt_stage, vision_stage

    stage = vision_stage if recipe == "vision" else gpt_stage
    history = stage(ij_subset=spec, ij="minres")
    assert len(history) == 2 and all(math.isfinite(h["upper_loss"]) for h in history)
    with pytest.raises(ValueError, match="bissl.ij_subset=layernorm selects no backbone"):
        vision_stage(ij_subset="layernorm")

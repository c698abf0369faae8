"""LARS against the published update rule (You et al., 2017), computed by hand in NumPy."""

import numpy as np
import pytest
import torch
from torch import nn

from implicitbilevel.bissl.lars import LARS, lars_param_groups


def _reference_step(w, g, m, *, lr, mu, wd, eta, denominator, adapt):
    """One LARS step in float64 NumPy, straight from the formula."""
    if not adapt:
        d = g.copy()
    else:
        d = g + wd * w
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        denom = gn + wd * wn if denominator == "paper" else np.linalg.norm(d)
        ratio = eta * wn / (denom + 1e-8) if wn > 0 and gn > 0 else 1.0
        d = ratio * d
    m = d if m is None else mu * m + d
    return w - lr * m, m


@pytest.mark.parametrize("denominator", ["paper", "update"])
def test_lars_matches_formula_over_three_steps(denominator):
    rng = np.random.default_rng(0)
    shapes = {"weight": (4, 3), "bias": (4,)}
    w0 = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(3)]
    hp = dict(lr=0.7, mu=0.9, wd=0.05, eta=0.001)

    params = {k: nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    opt = LARS(
        lars_param_groups(params.items(), weight_decay=hp["wd"]),
        lr=hp["lr"],
        momentum=hp["mu"],
        trust_coefficient=hp["eta"],
        trust_denominator=denominator,
    )
    ref_w, ref_m = dict(w0), {k: None for k in shapes}
    for g in grads:
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        for k in shapes:
            ref_w[k], ref_m[k] = _reference_step(
                ref_w[k], g[k], ref_m[k], **hp, denominator=denominator, adapt=(k == "weight")
            )
    for k in shapes:
        np.testing.assert_allclose(params[k].detach().numpy(), ref_w[k], rtol=1e-12, atol=1e-14)
    # the trust ratio really shrinks the weight step relative to plain SGD momentum
    assert np.abs(params["weight"].detach().numpy() - w0["weight"]).max() < 0.01


def test_param_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)
    groups = lars_param_groups(model, weight_decay=1e-6)
    adapted, excluded = groups
    assert [p.shape for p in adapted["params"]] == [torch.Size([2, 4])]
    assert adapted["weight_decay"] == 1e-6 and not adapted["lars_exclude"]
    assert len(excluded["params"]) == 3 and excluded["weight_decay"] == 0.0
    assert excluded["lars_exclude"]


def test_zero_weight_uses_unit_trust_ratio():
    p = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.0)
    p.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2, 2), -0.5, dtype=torch.float64))


def test_matches_timm_when_installed():
    timm_optim = pytest.importorskip("timm.optim")
    torch.manual_seed(0)
    a = nn.Linear(5, 3).double()
    b = nn.Linear(5, 3).double()
    b.load_state_dict(a.state_dict())
    ours = LARS(lars_param_groups(a, 1e-4), lr=0.3, momentum=0.9, trust_coefficient=0.001)
    groups = [{"params": [b.weight], "weight_decay": 1e-4}, {"params": [b.bias], "weight_decay": 0}]
    theirs = timm_optim.Lars(groups, lr=0.3, momentum=0.9, trust_coeff=0.001)
    for _ in range(4):
        x = torch.randn(8, 5, dtype=torch.float64)
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-12, atol=1e-14)


def test_rejects_bad_arguments():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, momentum=1.0)
    with pytest.raises(ValueError, match="trust_denominator"):
        LARS(p, trust_denominator="sum")

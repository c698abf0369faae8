"""The gallery example ``examples/hyper_cleaning_soba.py``: SOBA's full-batch direction at the
solved ``(W, v)`` is the implicit hypergradient, and both methods clean the data at a reduced
size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import implicitbilevel as ib
from implicitbilevel.stochastic import BilevelOracles

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hyper_cleaning_soba.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("example_hyper_cleaning_soba", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_soba_direction_at_the_solution_is_the_implicit_hypergradient(example):
    data = example.make_data(n_train=60, n_val=40)
    train = {k: v for k, v in data["train"].items() if k != "corrupted"}
    omega = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=F64)
    w = example.solve_inner(omega, torch.zeros(64, 10, dtype=F64), data, iters=200)
    x = {"omega": omega.clone().requires_grad_(True)}
    w_star = ib.argmin(lambda y, xx: example.inner(xx, y, train), {"W": w}, x,
                       ij=ib.ImplicitJacobian(ib.CG(max_iter=2000, tol=1e-13)))
    (implicit,) = torch.autograd.grad(example.outer(x, w_star, data["val"]), x["omega"])

    oracles = BilevelOracles.from_functions(example.outer, example.inner)
    xs, ys = {"omega": omega}, {"W": w}
    hess = torch.autograd.functional.hessian(
        lambda flat: example.inner(xs, {"W": flat.view(64, 10)}, train), w.reshape(-1))
    fx, fy = oracles.outer_grads(xs, ys, data["val"])
    v = {"W": torch.linalg.solve(hess, fy["W"].reshape(-1)).view(64, 10)}
    direction = fx["omega"] - oracles.curvature(xs, ys, train).cross(v)["omega"]
    torch.testing.assert_close(direction, implicit, rtol=1e-6, atol=1e-10)


def test_both_methods_clean_the_data(example, capsys):
    result = example.main(seconds=1.5, n_train=400)
    print(capsys.readouterr().out)
    uniform = result["uniform"]
    for name in ("soba", "implicit"):
        out = result[name]
        assert out["val_loss"] < 0.8 * uniform["val_loss"], name
        assert out["corrupted_down"] > 0.6 and out["clean_down"] < 0.25, name
        assert out["accuracy"] > uniform["accuracy"] + 0.03, name

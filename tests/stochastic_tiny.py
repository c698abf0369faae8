"""A tiny non-quadratic bilevel problem and its derivatives by dense autograd, for the tests of
:mod:`implicitbilevel.stochastic` (a helper module, not a test file)."""

from __future__ import annotations

import torch

F64 = torch.float64


def tiny():
    gen = torch.Generator().manual_seed(3)
    inner = {"a": torch.randn(6, 3, generator=gen, dtype=F64),
             "t": torch.randint(0, 2, (6,), generator=gen).to(F64) * 2 - 1,
             "index": torch.arange(6)}
    outer = {"a": torch.randn(5, 3, generator=gen, dtype=F64),
             "t": torch.randint(0, 2, (5,), generator=gen).to(F64) * 2 - 1,
             "index": torch.arange(5)}

    def g(x, y, b):
        loss = torch.nn.functional.softplus(-b["t"] * (b["a"] @ y["z"])).mean()
        return loss + 0.5 * (x["x"].exp() * y["z"] ** 2).sum()

    def f(x, y, b):
        return torch.nn.functional.softplus(-b["t"] * (b["a"] @ y["z"])).mean() + 0.1 * (
            x["x"] ** 2).sum() + 0.2 * (x["x"] * y["z"]).sum()

    x = {"x": torch.randn(3, generator=gen, dtype=F64) * 0.3}
    y = {"z": torch.randn(3, generator=gen, dtype=F64)}
    v = torch.randn(3, generator=gen, dtype=F64)
    return f, g, x, y, v, inner, outer


class Dense:
    """Every derivative the updates need, from dense autograd (not the library)."""

    def __init__(self, f, g):
        self.f, self.g = f, g

    def gy(self, x, z, b):
        return torch.func.grad(lambda zz: self.g({"x": x}, {"z": zz}, b))(z)

    def gx(self, x, z, b):
        return torch.func.grad(lambda xx: self.g({"x": xx}, {"z": z}, b))(x)

    def hyy(self, x, z, b):
        return torch.autograd.functional.hessian(lambda zz: self.g({"x": x}, {"z": zz}, b), z)

    def hxy(self, x, z, b):  # [i, j] = ∂² g / ∂z_i ∂x_j
        return torch.autograd.functional.jacobian(lambda xx: self.gy(xx, z, b), x)

    def fgrads(self, x, z, b):
        return torch.func.grad(lambda xx, zz: self.f({"x": xx}, {"z": zz}, b),
                               argnums=(0, 1))(x, z)


def close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

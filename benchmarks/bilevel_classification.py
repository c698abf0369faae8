"""The classification problems of the bilevel benchmark (:mod:`benchmarks.bilevel_problems`):
per-feature and per-class ℓ2 penalties of logistic regressions, and data hyper-cleaning.

Each reference solves the inner problem by Newton's method (dense for the binary models,
Newton-CG with closed-form Hessian-vector products for the softmax ones) to ``‖∇_y g‖ ≤ 1e-10``,
and ``∇h = −∇²_xy g u`` with ``∇²_yy g u = ∇_y f`` by conjugate gradients on the closed-form
products; none of it uses the library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy, one_hot, softplus

from benchmarks.bilevel_problems import (
    F64,
    BenchProblem,
    Params,
    _split,
    _standardise,
    _table,
    cg,
)

__all__ = ["cleaning_problem", "logreg_problem", "multilogreg_problem"]

IJCNN1 = (49_990, 91_701, 22)  # ijcnn1: training rows, ijcnn1_test rows, features
N_TEST = 20_000


def _binary_data(name: str, seed: int) -> tuple[dict, dict, dict]:
    from sklearn.datasets import load_breast_cancer, make_classification

    if name == "ijcnn1":  # 21 drawn features and a constant one, the intercept (9:1 classes)
        n_tr, n_val, p = IJCNN1
        feats, labels = make_classification(
            n_samples=n_tr + n_val + N_TEST, n_features=p - 1, n_informative=10, n_redundant=6,
            weights=[0.9], flip_y=0.02, class_sep=1.0, random_state=seed)
        feats, labels = torch.tensor(feats, dtype=F64), torch.tensor(labels, dtype=F64)
        tr, val, te = (torch.arange(n_tr), torch.arange(n_tr, n_tr + n_val),
                       torch.arange(n_tr + n_val, len(labels)))
    else:
        feats, labels = load_breast_cancer(return_X_y=True)
        feats, labels = torch.tensor(feats, dtype=F64), torch.tensor(labels, dtype=F64)
        tr, val, te = _split(len(labels), seed)
    a_tr, a_val, a_te = _standardise(feats[tr], feats[val], feats[te])
    if name == "ijcnn1":
        a_tr, a_val, a_te = (torch.cat([a, torch.ones(len(a), 1, dtype=F64)], 1)
                             for a in (a_tr, a_val, a_te))
    signs = 2 * labels - 1
    return _table(a_tr, signs[tr]), _table(a_val, signs[val]), _table(a_te, signs[te])


def _log_loss(z: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return softplus(-batch["t"] * (batch["a"] @ z)).mean()


def _newton(grad_hess: Callable[[Tensor], tuple[Tensor, Tensor]], value: Callable[[Tensor], Tensor],
            z: Tensor, tol: float = 1e-10) -> Tensor:
    for _ in range(100):
        grad, hess = grad_hess(z)
        if float(grad.norm()) <= tol:
            break
        step, scale = torch.linalg.solve(hess, grad), 1.0
        while float(value(z - scale * step)) > float(value(z)) and scale > 1e-8:
            scale /= 2
        z = z - scale * step
    return z


def logreg_problem(name: str = "ijcnn1", seed: int = 0) -> BenchProblem:
    """Binary logistic regression with one penalty ``e^{x_j}`` per feature (module docstring of
    :mod:`benchmarks.bilevel_problems`); ``name`` is ``"ijcnn1"`` or ``"breast_cancer"``.

    ``∇²_zz g = Aᵀ diag(σ(m)(1 − σ(m))) A / n + diag(e^x)`` with margins ``m = t ⊙ Az``,
    ``∇²_{x_j z} g = e^{x_j} z_j e_j``, so ``∇h = −e^x ⊙ z* ⊙ [∇²_zz g]⁻¹ ∇_z f``.
    """
    train, val, test = _binary_data(name, seed)
    p = train["a"].shape[1]

    def g(x: Params, y: Params, batch: dict) -> Tensor:
        z = y["z"]
        return _log_loss(z, batch) + 0.5 * (x["x"].exp() * z.square()).sum()

    def f(x: Params, y: Params, batch: dict) -> Tensor:
        return _log_loss(y["z"], batch)

    a, t = train["a"], train["t"]

    def grad_hess(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(t * (a @ z))
        grad = a.T @ (-t * (1 - s)) / len(t) + x.exp() * z
        return grad, (a.T * (s * (1 - s))) @ a / len(t) + torch.diag(x.exp())

    def solve(x: Params, y_warm: Params | None = None) -> Params:
        z0 = torch.zeros(p, dtype=F64) if y_warm is None else y_warm["z"]
        return {"z": _newton(lambda z: grad_hess(z, x["x"]),
                             lambda z: g(x, {"z": z}, train), z0)}

    def hypergradient(x: Params, y: Params) -> Params:
        z = y["z"]
        grad_f = val["a"].T @ (-val["t"] * torch.sigmoid(-val["t"] * (val["a"] @ z))) / len(
            val["t"])
        u = torch.linalg.solve(grad_hess(z, x["x"])[1], grad_f)
        return {"x": -x["x"].exp() * z * u}

    def test_error(y: Params) -> float:
        return float(((test["a"] @ y["z"]) * test["t"] <= 0).double().mean())

    gen = torch.Generator().manual_seed(seed)
    x0 = {"x": torch.rand(p, generator=gen, dtype=F64).clamp_min(1e-3).log()}
    title = {"ijcnn1": "ijcnn1-shaped (make_classification)", "breast_cancer": "breast-cancer"}
    return BenchProblem(
        name, f"logistic regression, one penalty per feature, {title[name]}: "
        f"{len(t)} train / {len(val['t'])} validation / {len(test['t'])} test, {p} features",
        f, g, x0, {"z": torch.zeros(p, dtype=F64)}, train, val, solve, hypergradient,
        test_error, lambda x: float(x["x"].exp().min()),
        info={"n_train": len(t), "n_validation": len(val["t"]), "n_test": len(test["t"]),
              "features": p, "seed": seed})


# -- softmax models on digits --------------------------------------------------------------------


def _digits(seed: int, corrupt: float = 0.0) -> tuple[dict, dict, dict]:
    from sklearn.datasets import load_digits

    feats, labels = load_digits(return_X_y=True)
    feats, labels = torch.tensor(feats, dtype=F64), torch.tensor(labels)
    tr, val, te = _split(len(labels), seed)
    a_tr, a_val, a_te = _standardise(feats[tr], feats[val], feats[te])
    t_tr = labels[tr].clone()
    if corrupt:
        gen = torch.Generator().manual_seed(seed + 1)
        flipped = torch.rand(len(t_tr), generator=gen, dtype=F64) < corrupt
        t_tr[flipped] = torch.randint(0, 10, (int(flipped.sum()),), generator=gen)
    return _table(a_tr, t_tr), _table(a_val, labels[val]), _table(a_te, labels[te])


def _softmax_hvp(probs: Tensor, av: Tensor) -> Tensor:
    prod = probs * av
    return prod - probs * prod.sum(1, keepdim=True)


class _Softmax:
    """``G(z) = mean w_i CE_i(z) + ½ Σ_k ρ_k ‖z_{:,k}‖²``: gradient, product, Newton-CG."""

    def __init__(self, train: dict, weights: Tensor, ridge: Tensor) -> None:
        self.a, self.t, self.w, self.ridge = train["a"], train["t"], weights, ridge
        self.onehot = one_hot(self.t, 10).to(F64)

    def grad(self, z: Tensor) -> Tensor:
        probs = torch.softmax(self.a @ z, 1)
        return self.a.T @ (self.w[:, None] * (probs - self.onehot)) / len(self.t) + z * self.ridge

    def hvp_at(self, z: Tensor) -> Callable[[Tensor], Tensor]:
        """``v ↦ ∇²G(z) v`` on flat vectors (the probabilities computed once)."""
        probs, n = torch.softmax(self.a @ z, 1), len(self.t)
        scaled = self.a.T * (1.0 / n)

        def product(flat: Tensor) -> Tensor:
            v = flat.view_as(z)
            out = scaled @ (_softmax_hvp(probs, self.a @ v) * self.w[:, None]) + v * self.ridge
            return out.reshape(-1)

        return product

    def value(self, z: Tensor) -> Tensor:
        ce = cross_entropy(self.a @ z, self.t, reduction="none")
        return (self.w * ce).mean() + 0.5 * (self.ridge * z.square()).sum()

    def solve(self, z: Tensor, tol: float = 1e-10) -> Tensor:
        for _ in range(60):
            grad = self.grad(z)
            if float(grad.norm()) <= tol:
                break
            step = self.inverse_hvp(z, grad, tol=1e-3 * min(1.0, float(grad.norm())))
            scale = 1.0
            while float(self.value(z - scale * step)) > float(self.value(z)) and scale > 1e-8:
                scale /= 2
            z = z - scale * step
        return z

    def inverse_hvp(self, z: Tensor, rhs: Tensor, tol: float = 1e-12) -> Tensor:
        """``[∇²G(z)]⁻¹ rhs`` by conjugate gradients."""
        return cg(self.hvp_at(z), rhs.reshape(-1), tol=tol).view_as(z)


def _ce(y: Params, batch: dict) -> Tensor:
    return cross_entropy(batch["a"] @ y["z"], batch["t"])


def _val_grad(z: Tensor, val: dict) -> Tensor:
    probs = torch.softmax(val["a"] @ z, 1)
    return val["a"].T @ (probs - one_hot(val["t"], 10).to(F64)) / len(val["t"])


def _error(test: dict) -> Callable[[Params], float]:
    return lambda y: float(((test["a"] @ y["z"]).argmax(1) != test["t"]).double().mean())


def multilogreg_problem(seed: int = 0) -> BenchProblem:
    """Multinomial logistic regression on digits with one penalty ``e^{x_k}`` per class:
    ``∇²_{x_k z} g · u = e^{x_k} ⟨z_{:,k}, u_{:,k}⟩``, so ``∇h_k = −e^{x_k} ⟨z*_{:,k}, u_{:,k}⟩``.
    """
    train, val, test = _digits(seed)
    p = train["a"].shape[1]

    def g(x: Params, y: Params, batch: dict) -> Tensor:
        return _ce(y, batch) + 0.5 * (x["x"].exp() * y["z"].square().sum(0)).sum()

    def model(x: Params) -> _Softmax:
        return _Softmax(train, torch.ones(len(train["t"]), dtype=F64), x["x"].exp()[None, :])

    def solve(x: Params, y_warm: Params | None = None) -> Params:
        z0 = torch.zeros(p, 10, dtype=F64) if y_warm is None else y_warm["z"]
        return {"z": model(x).solve(z0)}

    def hypergradient(x: Params, y: Params) -> Params:
        u = model(x).inverse_hvp(y["z"], _val_grad(y["z"], val))
        return {"x": -x["x"].exp() * (y["z"] * u).sum(0)}

    gen = torch.Generator().manual_seed(seed)
    x0 = {"x": torch.rand(10, generator=gen, dtype=F64).clamp_min(1e-3).log()}
    return BenchProblem(
        "digits_multilogreg", f"multinomial logistic regression, one penalty per class, digits: "
        f"{len(train['t'])} train / {len(val['t'])} validation / {len(test['t'])} test",
        lambda x, y, b: _ce(y, b), g, x0, {"z": torch.zeros(p, 10, dtype=F64)}, train, val,
        solve, hypergradient, _error(test), lambda x: float(x["x"].exp().min()),
        info={"n_train": len(train["t"]), "n_validation": len(val["t"]),
              "n_test": len(test["t"]), "seed": seed})


RIDGE = 0.2


def cleaning_problem(corrupt: float = 0.5, seed: int = 0) -> BenchProblem:
    """Data hyper-cleaning on digits, ``g = mean σ(x_i) CE_i(z) + 0.2 ‖z‖²`` (``x_i`` read at
    the batch's ``"index"``): ``∇h_i = −σ'(x_i)/n ⟨(p_i − e_{t_i}) a_iᵀ, u⟩``."""
    train, val, test = _digits(seed, corrupt)
    p, n = train["a"].shape[1], len(train["t"])

    def g(x: Params, y: Params, batch: dict) -> Tensor:
        weights = torch.sigmoid(x["x"][batch["index"]])
        ce = cross_entropy(batch["a"] @ y["z"], batch["t"], reduction="none")
        return (weights * ce).mean() + RIDGE * y["z"].square().sum()

    def model(x: Params) -> _Softmax:
        return _Softmax(train, torch.sigmoid(x["x"]), torch.full((1, 10), 2 * RIDGE, dtype=F64))

    def solve(x: Params, y_warm: Params | None = None) -> Params:
        z0 = torch.zeros(p, 10, dtype=F64) if y_warm is None else y_warm["z"]
        return {"z": model(x).solve(z0)}

    def hypergradient(x: Params, y: Params) -> Params:
        z = y["z"]
        u = model(x).inverse_hvp(z, _val_grad(z, val))
        resid = torch.softmax(train["a"] @ z, 1) - one_hot(train["t"], 10).to(F64)
        sig = torch.sigmoid(x["x"])
        return {"x": -(sig * (1 - sig) / n) * ((train["a"] @ u) * resid).sum(1)}

    return BenchProblem(
        f"cleaning_{round(100 * corrupt)}", f"data hyper-cleaning, digits, {corrupt:.0%} of "
        f"{n} training labels corrupted, {len(val['t'])} clean validation, {len(test['t'])} test",
        lambda x, y, b: _ce(y, b), g, {"x": torch.zeros(n, dtype=F64)},
        {"z": torch.zeros(p, 10, dtype=F64)}, train, val, solve, hypergradient, _error(test),
        lambda x: 2 * RIDGE, info={"n_train": n, "corrupt": corrupt, "ridge": RIDGE,
                                   "seed": seed})

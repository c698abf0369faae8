"""The methods of the bilevel suite (:mod:`benchmarks.bilevel_suite`), each as a runner that takes
one outer step at a time on a :class:`~benchmarks.bilevel_problems.BenchProblem`.

- The stochastic methods of :mod:`implicitbilevel.stochastic` (SOBA, SABA, stocBiO, AmIGO,
  F2SA, BOME) on minibatches of 64 rows drawn without replacement in reshuffled epochs (one
  sampler per level, seeded), BOME on full batches as benchopt runs it. stocBiO and AmIGO take
  10 inner steps and 10 Neumann / ``v`` steps, F2SA 10 inner steps with ``λ_0 = 1``, BOME 10
  inner steps with ``η = 0.5`` (benchopt's defaults).
- Outer gradient descent with the library's implicit hypergradient
  (:func:`implicitbilevel.argmin`) on full batches: the inner problem warm-started and advanced by
  10 gradient steps, the system solved by 10 iterations of CG, of MINRES, or of CG
  preconditioned by a rank-10 Nyström approximation (the system kept exact by the split
  ``g − ½δ‖y‖²`` with damping ``δ``, half a lower bound of the curvature); and ``argmin`` after
  an L-BFGS inner solve (20 iterations, strong Wolfe) with its default CG.

Every method is parametrised as benchopt's are, by a step size ``s`` and an outer ratio ``r``:
the inner (and ``v``) step is ``s``, the outer step ``s / r``. Oracle calls are reported in
full-batch equivalents: a call on ``b`` of ``n`` rows counts ``b / n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import implicitbilevel as ib
from benchmarks.bilevel_problems import BenchProblem, Params, rows
from implicitbilevel import stochastic as st

__all__ = ["BATCH", "METHODS", "Runner", "make_runner"]

BATCH = 64
INNER_STEPS = 10
NYSTROM_RANK = 10


def sampler(data: dict[str, Tensor], batch: int, gen: torch.Generator) -> Callable[[], dict]:
    """Batches of ``batch`` rows without replacement, the order reshuffled every epoch."""
    n = int(data["index"].shape[0])
    state = {"perm": torch.randperm(n, generator=gen), "pos": 0}

    def draw() -> dict[str, Tensor]:
        if state["pos"] + batch > n:
            state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
        index = state["perm"][state["pos"]:state["pos"] + batch]
        state["pos"] += batch
        return rows(data, index)

    return draw


def _clone(p: Params) -> Params:
    return {n: t.clone() for n, t in p.items()}


class Runner:
    """One run: ``x``, ``y`` and ``step()``; ``equivalents()`` the oracle calls so far in
    full-batch units."""

    def __init__(self, problem: BenchProblem) -> None:
        self.problem = problem
        self.x, self.y = _clone(problem.x0), _clone(problem.y0)

    def step(self) -> None:
        raise NotImplementedError

    def equivalents(self) -> float:
        raise NotImplementedError


class StochasticRunner(Runner):
    """A method of :mod:`implicitbilevel.stochastic` on the problem's two callables."""

    def __init__(self, problem: BenchProblem, cls: type, hyper: dict[str, Any],
                 gen: torch.Generator, full_batch: bool = False) -> None:
        super().__init__(problem)
        extra = {"n_inner": problem.n_inner, "n_outer": problem.n_outer} if cls is st.SABA else {}
        self.method = cls.from_functions(problem.f, problem.g, self.x, self.y, **hyper, **extra)
        if full_batch:
            self.upper, self.lower = problem.outer, problem.inner
            self.b_in, self.b_out = problem.n_inner, problem.n_outer
        else:
            self.b_in, self.b_out = min(BATCH, problem.n_inner), min(BATCH, problem.n_outer)
            self.upper = sampler(problem.outer, self.b_out, gen)
            self.lower = sampler(problem.inner, self.b_in, gen)

    def step(self) -> None:
        self.method.step(self.upper, self.lower)

    def equivalents(self) -> float:
        c = self.method.counts
        return ((c.grad_inner + c.hvp + c.cross) * self.b_in / self.problem.n_inner
                + c.grad_outer * self.b_out / self.problem.n_outer)


class ImplicitRunner(Runner):
    """Outer gradient descent with :func:`implicitbilevel.argmin`'s hypergradient."""

    def __init__(self, problem: BenchProblem, kind: str, step: float, ratio: float) -> None:
        super().__init__(problem)
        self.kind, self.inner_lr, self.outer_lr = kind, step, step / ratio
        self.calls = 0.0

    def _inner(self) -> None:
        pb, x = self.problem, self.x
        if self.kind == "argmin-lbfgs":
            z = {n: t.clone().requires_grad_(True) for n, t in self.y.items()}
            opt = torch.optim.LBFGS(list(z.values()), max_iter=20, tolerance_grad=1e-12,
                                    tolerance_change=1e-14, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = pb.g(x, z, pb.inner)
                loss.backward()
                self.calls += 1
                return loss

            opt.step(closure)
            with torch.no_grad():
                for n in self.y:
                    self.y[n].copy_(z[n])
            return
        for _ in range(INNER_STEPS):
            y = {n: t.clone().requires_grad_(True) for n, t in self.y.items()}
            grads = torch.autograd.grad(pb.g(x, y, pb.inner), list(y.values()))
            with torch.no_grad():
                for t, gr in zip(self.y.values(), grads):
                    t.sub_(self.inner_lr * gr)
            self.calls += 1

    def _solver(self) -> tuple[ib.ImplicitJacobian, float]:
        if self.kind == "implicit-cg":
            return ib.ImplicitJacobian(ib.CG(max_iter=10), on_breakdown="ignore"), 0.0
        if self.kind == "implicit-minres":
            return ib.ImplicitJacobian(ib.MINRES(max_iter=10), on_breakdown="ignore"), 0.0
        if self.kind == "implicit-nystrom-pcg":
            delta = 0.5 * self.problem.curvature_floor(self.x)
            pre = ib.NystromPreconditioner(rank=min(NYSTROM_RANK, sum(t.numel()
                                                                       for t in self.y.values())))
            return ib.ImplicitJacobian(ib.CG(max_iter=10, preconditioner=pre), damping=delta,
                                       on_breakdown="ignore"), delta
        return ib.ImplicitJacobian(on_breakdown="ignore"), 0.0  # argmin's CG(100, 1e-6)

    def step(self) -> None:
        pb = self.problem
        self._inner()
        ij, delta = self._solver()
        records: list[ib.ArgminSolve] = []

        def objective(y: Params, x: Params) -> Tensor:
            value = pb.g(x, y, pb.inner)
            return value - 0.5 * delta * sum((t ** 2).sum() for t in y.values()) if delta else value

        x = {n: t.clone().requires_grad_(True) for n, t in self.x.items()}
        y_star = ib.argmin(objective, self.y, x, ij=ij, on_nonstationary="ignore",
                           on_solve=records.append)
        grads = torch.autograd.grad(pb.f(x, y_star, pb.outer), list(x.values()))
        with torch.no_grad():
            for t, gr in zip(self.x.values(), grads):
                t.sub_(self.outer_lr * gr)
        extra = NYSTROM_RANK if delta else 0
        self.calls += 1 + 1 + records[-1].info.iterations + extra  # ∇f, mixed, products, sketch

    def equivalents(self) -> float:
        return self.calls


@dataclass(frozen=True)
class MethodSpec:
    """A method of the suite: its name, family and how to build a run."""

    name: str
    family: str
    build: Callable[[BenchProblem, float, float, torch.Generator], Runner]


def _stochastic(cls: type, **fixed: Any) -> Callable[..., Runner]:
    def build(pb: BenchProblem, step: float, ratio: float, gen: torch.Generator) -> Runner:
        hyper = {"lr_inner": step, "lr_outer": step / ratio, **fixed}
        return StochasticRunner(pb, cls, hyper, gen, full_batch=cls is st.BOME)
    return build


def _implicit(kind: str) -> Callable[..., Runner]:
    return lambda pb, step, ratio, gen: ImplicitRunner(pb, kind, step, ratio)


METHODS = (
    MethodSpec("SOBA", "stochastic", _stochastic(st.SOBA)),
    MethodSpec("SABA", "stochastic", _stochastic(st.SABA)),
    MethodSpec("stocBiO", "stochastic", _stochastic(st.StocBiO, inner_steps=INNER_STEPS,
                                                    neumann_steps=10)),
    MethodSpec("AmIGO", "stochastic", _stochastic(st.AmIGO, inner_steps=INNER_STEPS,
                                                  v_steps=10)),
    MethodSpec("F2SA", "stochastic", _stochastic(st.F2SA, inner_steps=INNER_STEPS, lam0=1.0,
                                                 lam_increment=0.1)),
    MethodSpec("BOME", "stochastic", _stochastic(st.BOME, inner_steps=INNER_STEPS, eta=0.5)),
    MethodSpec("implicit-cg", "implicit", _implicit("implicit-cg")),
    MethodSpec("implicit-minres", "implicit", _implicit("implicit-minres")),
    MethodSpec("implicit-nystrom-pcg", "implicit", _implicit("implicit-nystrom-pcg")),
    MethodSpec("argmin-lbfgs", "implicit", _implicit("argmin-lbfgs")),
)
"""Every method of the suite, stochastic first."""


def make_runner(spec: MethodSpec, problem: BenchProblem, step: float, ratio: float,
                seed: int) -> Runner:
    """A fresh run of ``spec`` at step size ``step``, outer ratio ``ratio``, sampler ``seed``."""
    return spec.build(problem, step, ratio, torch.Generator().manual_seed(seed))

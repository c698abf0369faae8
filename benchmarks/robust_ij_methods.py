"""What :mod:`benchmarks.robust_ij` measures and on what: the method families, the BiSSL problem
of a pretrained network at one ``μ``, the peers' upper steps and the networks of a mode.

A :class:`Family` is a library solver on the exact Hessian or the Gauss–Newton curvature, swept
over ``N_c`` (products per solve) or the Nyström rank ``k``, or a peer's upper step (the original
BiSSL scheme, TorchOpt, Betty) swept over ``N_c``. :data:`FAMILIES` lists them in table order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from implicitbilevel import (
    CG,
    MINRES,
    BilevelProblem,
    LanczosDeflation,
    LanczosPreconditioner,
    LanczosSolver,
    LinearSolver,
    Neumann,
    NystromPreconditioner,
    NystromSolver,
    RecycledCG,
    RecycledMINRES,
)

from .peers import betty_upper_step, products_per_solve, torchopt_upper_step
from .pretrained import Network, gpt_network, vision_network
from .reference import reference_upper_step
from .toy_networks import toy_networks
from .workloads import BiSSLWorkload, bissl_problem

__all__ = ["FAMILIES", "MEMORY_VARIANTS", "NEUMANN_TOL", "PEER_MODULE", "Family", "networks",
           "net_problem", "peer_products", "peer_step", "reuse_solver", "workload"]

# Neumann stops at the float32 rounding floor, as CG and MINRES do by themselves (10·eps·||b||).
NEUMANN_TOL = 10 * torch.finfo(torch.float32).eps

MEMORY_VARIANTS = ("fine-tuning step", "cg", "minres", "neumann", "pcg", "minres-nystrom",
                   "nystrom", "gn-cg", "gn-pcg", "gn-nystrom", "reference", "torchopt-cg",
                   "torchopt-normal-cg", "betty-cg")


@dataclass(frozen=True)
class Family:
    """A method: a solver (built from N_c or a rank) on a curvature, or a peer's upper step."""

    key: str
    label: str
    curvature: str  # "hessian", "gauss-newton" or "peer"
    sweep: str  # "N_c" (products per solve) or "k" (Nyström rank)
    robust: bool = False
    uses_rank: bool = False
    #: the solver keeps what one operator's solves found (a recycle space, a Lanczos
    #: preconditioner): its 8 solves depend on each other and it is timed by whole alternations
    stateful: bool = False

    @property
    def repeats_at_larger_budgets(self) -> bool:
        """A solve that stopped before its ``N_c`` is repeated exactly by a larger ``N_c`` (not
        so for a stateful solver: what it keeps depends on the earlier solves' budgets)."""
        return self.sweep == "N_c" and not self.stateful

    def solver(self, value: int, pcg_rank: int) -> LinearSolver:
        """The library solver of this family at ``N_c = value`` (or rank ``value``)."""
        pre = NystromPreconditioner(rank=pcg_rank)
        return {
            "cg": lambda: CG(max_iter=value),
            "minres": lambda: MINRES(max_iter=value),
            "neumann": lambda: Neumann(max_iter=value, tol=NEUMANN_TOL),
            "pcg": lambda: CG(max_iter=value, preconditioner=pre),
            "minres-nystrom": lambda: MINRES(max_iter=value, preconditioner=pre),
            "nystrom": lambda: NystromSolver(rank=value),
            "gn-cg": lambda: CG(max_iter=value),
            "gn-pcg": lambda: CG(max_iter=value, preconditioner=pre),
            "gn-nystrom": lambda: NystromSolver(rank=value),
            "recycled-cg": lambda: reuse_solver("recycled-cg", value),
            "recycled-minres": lambda: reuse_solver("recycled-minres", value),
            "minres-lanczos": lambda: reuse_solver("minres-lanczos", value),
            "gn-recycled-cg": lambda: reuse_solver("recycled-cg", value),
        }[self.key]()

    def rank(self, value: int, pcg_rank: int) -> int | None:
        """The Nyström rank this configuration builds (``None``: no approximation)."""
        if not self.uses_rank:
            return None
        return value if self.sweep == "k" else pcg_rank


#: Default settings of the solvers that reuse one operator across solves (here and in
#: :mod:`benchmarks.recycled_ij`): harmonic Ritz vectors kept and the window they are updated
#: from; the Lanczos rank and its products, built once per operator.
RECYCLE_DIM, RECYCLE_WINDOW, LANCZOS_RANK, LANCZOS_PRODUCTS = 16, 20, 8, 32


def reuse_solver(key: str, n_c: int, tol: float = 0.0, *, recycle_dim: int = RECYCLE_DIM,
                 window: int = RECYCLE_WINDOW, lanczos_rank: int = LANCZOS_RANK,
                 lanczos_products: int = LANCZOS_PRODUCTS) -> LinearSolver:
    """The solver of method ``key`` (``cg``, ``minres``, ``recycled-cg``, ``recycled-minres``,
    ``minres-lanczos``, ``recycled-minres-lanczos``, ``lanczos-woodbury``) at ``N_c = n_c``
    products per solve and tolerance ``tol``."""
    lanczos = {"rank": lanczos_rank, "products": lanczos_products}
    return {
        "cg": lambda: CG(max_iter=n_c, tol=tol),
        "minres": lambda: MINRES(max_iter=n_c, tol=tol),
        "recycled-cg": lambda: RecycledCG(max_iter=n_c, tol=tol, recycle_dim=recycle_dim,
                                          window=window),
        "recycled-minres": lambda: RecycledMINRES(max_iter=n_c, tol=tol, recycle_dim=recycle_dim,
                                                  window=window),
        "minres-lanczos": lambda: MINRES(max_iter=n_c, tol=tol,
                                         preconditioner=LanczosPreconditioner(**lanczos)),
        "recycled-minres-lanczos": lambda: RecycledMINRES(
            max_iter=n_c, tol=tol, recycle_dim=recycle_dim, window=window,
            deflation=LanczosDeflation(**lanczos)),
        "lanczos-woodbury": lambda: LanczosSolver(**lanczos),
    }[key]()

FAMILIES: tuple[Family, ...] = (
    Family("cg", "CG", "hessian", "N_c"),
    Family("minres", "MINRES", "hessian", "N_c", robust=True),
    Family("neumann", "Neumann (alpha = 1)", "hessian", "N_c"),  # stops at NEUMANN_TOL
    Family("pcg", "CG + Nystrom preconditioner", "hessian", "N_c", uses_rank=True),
    Family("minres-nystrom", "MINRES + Nystrom preconditioner", "hessian", "N_c",
           uses_rank=True),
    Family("nystrom", "Nystrom solver (Woodbury)", "hessian", "k", uses_rank=True),
    Family("gn-cg", "Gauss-Newton + CG", "gauss-newton", "N_c", robust=True),
    Family("gn-pcg", "Gauss-Newton + CG + Nystrom preconditioner", "gauss-newton", "N_c",
           robust=True, uses_rank=True),
    Family("gn-nystrom", "Gauss-Newton + Nystrom solver", "gauss-newton", "k", uses_rank=True),
    Family("recycled-cg", "RecycledCG", "hessian", "N_c", stateful=True),
    Family("recycled-minres", "RecycledMINRES", "hessian", "N_c", stateful=True),
    Family("minres-lanczos", "MINRES + Lanczos preconditioner", "hessian", "N_c",
           stateful=True),
    Family("gn-recycled-cg", "Gauss-Newton + RecycledCG", "gauss-newton", "N_c", stateful=True),
    Family("reference", "original BiSSL scheme (double backward per HVP, blockwise CG)", "peer",
           "N_c"),
    Family("torchopt-cg", "TorchOpt custom_root + solve_cg", "peer", "N_c"),
    Family("torchopt-normal-cg", "TorchOpt default (solve_normal_cg)", "peer", "N_c"),
    Family("betty-cg", "Betty cg (betty-ml)", "peer", "N_c"),
)
PEER_MODULE = {"torchopt-cg": "torchopt", "torchopt-normal-cg": "torchopt", "betty-cg": "betty"}


def peer_step(key: str, w: BiSSLWorkload, n: int) -> Any:
    """One upper step of the peer family ``key`` with ``n`` iterations."""
    if key == "reference":
        return reference_upper_step(w, max_iter=n)
    if key == "torchopt-cg":
        return torchopt_upper_step(w, "cg", max_iter=n)
    if key == "torchopt-normal-cg":
        return torchopt_upper_step(w, "normal-cg", max_iter=n)
    if key == "betty-cg":
        return betty_upper_step(w, "cg", iterations=n)
    raise ValueError(key)


def peer_products(key: str, n: int) -> int:
    """Curvature products per solve a peer spends (normal-equation CG: two per iteration)."""
    return products_per_solve("normal-cg" if key == "torchopt-normal-cg" else "cg", n)


def net_problem(net: Network, mu: float, lam: float, curvature: str,
            solver: LinearSolver | None = None) -> BilevelProblem:
    """The BiSSL problem as the recipes build it, at ``μ = λ + λ_damp``, on ``curvature``."""
    return bissl_problem(
        net.downstream_loss, net.pretext_loss, net.backbone, mu, lam, solver,
        curvature=net.gauss_newton if curvature == "gauss-newton" else "hessian",
    )


def workload(net: Network, mu: float, lam: float, i: int) -> BiSSLWorkload:
    """The peers' view of ``net`` with the ``i``-th upper batch (BatchNorm statistics copied)."""
    return BiSSLWorkload(
        name=net.name, downstream_loss=net.peer_downstream_loss,
        lower_loss=net.peer_pretext_loss,
        upper=net.upper, lower=net.lower, backbone=net.backbone,
        upper_batch=net.upper_batches[i], lower_batch=net.lower_batch, mu=mu, lam=lam,
    )


def networks(s: Any, device: str, log: Callable[[str], None]) -> list[Network]:
    """The networks of the settings ``s`` (``vision``, ``gpt`` or the ``toy`` pair)."""
    nets: list[Network] = []
    for name in s.networks:
        if name == "vision":
            nets.append(vision_network(epochs=s.vision_epochs, lower_batch=s.vision_lower_batch,
                                       upper_batch=s.vision_upper_batch,
                                       upper_steps=s.upper_steps, device=device, log=log))
        elif name == "gpt":
            nets.append(gpt_network(steps=s.gpt_steps, task=s.gpt_task,
                                    lower_batch=s.gpt_lower_batch,
                                    upper_batch=s.gpt_upper_batch, upper_steps=s.upper_steps,
                                    device=device, log=log))
        elif name == "toy":
            nets.extend(toy_networks(device, upper_steps=s.upper_steps))
        else:
            raise ValueError(f"unknown network {name!r}")
    return nets

"""Lower-level regularisers ``r(x, y)`` coupling the upper variables ``x`` to the lower ones ``y``.

The lower objective is ``G(x, y) = ℓ(y) + λ r(x, y)`` (thesis eq. 4.2-4.3). Implicit
differentiation needs three derivatives of ``r`` (eq. 3.3): the lower gradient ``∇_y r``, the
lower Hessian-vector product ``∇²_yy r · z`` and the mixed product ``∇_x ⟨∇_y r, u⟩``.

:class:`ProximalL2` is BiSSL's ``½‖θ_D − θ_P‖²`` with all three in closed form (the fast path of
eq. 4.8-4.9: the mixed Hessian is ``−I``, so no vector-Jacobian product is needed).
:class:`Regularizer` takes any twice-differentiable ``r(x, y)`` and derives them with
``torch.func``, which serves hyperparameter optimisation (``r = ½ Σ e^{x_i} y_i²``) and
iMAML-style meta-learning alike.

:class:`SumRegularizer` adds regularisers, ``r = Σ_k r_k``, each keeping its own derivatives
(thesis eq. 3.3).

Every derivative the implicit step needs is linear in ``r``, so the sum's are the sums of the
terms': ``∇_y r = Σ ∇_y r_k``, ``∇²_yy r · z = Σ ∇²_yy r_k · z`` and
``∇_x ⟨∇_y r, u⟩ = Σ ∇_x ⟨∇_y r_k, u⟩``. A closed-form term (:class:`~implicitbilevel.ProximalL2`)
keeps its fast path while a general :class:`~implicitbilevel.Regularizer` over a few names adds
what it couples: appendix G's lower objective, for instance, is
``L^P(θ_P, φ_P) + λ [½‖θ_D − θ_P‖² + L^P(θ_D, φ_P)/λ]``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import check_coupled, name_list
from .curvature.hessian import _hvp_context, hvp
from .tree import Params, tree_sub

__all__ = ["BaseRegularizer", "ProximalL2", "Regularizer", "SumRegularizer"]


class BaseRegularizer(abc.ABC):
    """The derivatives of ``r(x, y)`` that :class:`~implicitbilevel.BilevelProblem` needs.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> [issubclass(c, ib.BaseRegularizer) for c in (ib.ProximalL2, ib.Regularizer)]
        [True, True]
        >>> r = ib.ProximalL2()                           # every name both dicts hold is coupled
        >>> r.coupled_names({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
        ['a']
    """

    identity_lower_hessian: bool = False
    """Whether ``∇²_yy r = I`` on the coupled names (then the IJ system there is ``I + H/μ``)."""

    def bind(self, batch: Any) -> BaseRegularizer:
        """The regulariser at the lower batch ``batch`` (the one of ``ℓ``'s gradient or Hessian);
        itself unless it reads data (:class:`Regularizer` with ``uses_batch=True``)."""
        return self

    @abc.abstractmethod
    def coupled_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """Names of the lower variables ``r`` depends on (validated against both dicts)."""

    @abc.abstractmethod
    def value(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
        """``r(x, y)``."""

    @abc.abstractmethod
    def lower_grad(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Params:
        """``∇_y r(x, y)`` over :meth:`coupled_names`."""

    @abc.abstractmethod
    def lower_hvp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], z: Mapping[str, Tensor]
    ) -> Params:
        """``∇²_yy r(x, y) · z`` over the coupled names present in ``z`` (others are zero)."""

    @abc.abstractmethod
    def mixed_vjp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], u: Mapping[str, Tensor]
    ) -> Params:
        """``∇_x ⟨∇_y r(x, y), u⟩`` over the upper names ``r`` depends on (others are zero)."""


class ProximalL2(BaseRegularizer):
    """``r(θ_D, θ_P) = ½ Σ_n ‖θ_D[n] − θ_P[n]‖²`` over the coupled parameter names (eq. 4.8).

    The same name refers to the upper copy in the upper dict and the lower copy in the lower dict.
    ``∇_θP r = θ_P − θ_D``, ``∇²_θPθP r = I`` and ``∇_θD ⟨∇_θP r, u⟩ = −u``.

    Args:
        names: the coupled (backbone) parameter names; ``None`` couples every name present in both
            the upper and the lower dict.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> r = ib.ProximalL2(["w"])
        >>> x = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> y = {"w": torch.tensor([0.0, 4.0], dtype=torch.float64)}
        >>> round(float(r.value(x, y)), 12), r.lower_grad(x, y)["w"].tolist()  # |x-y|^2/2, y-x
        (2.5, [-1.0, 2.0])
    """

    identity_lower_hessian = True

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.names = None if names is None else list(dict.fromkeys(name_list(names, "names")))
        if self.names is not None and not self.names:
            raise ValueError("ProximalL2 needs at least one coupled parameter name")

    def coupled_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """The coupled names, checked to exist at both levels with equal shapes, dtypes and
        devices, in different tensors."""
        if self.names is None:
            names = [n for n in lower if n in upper]
            if not names:
                raise ValueError(
                    "ProximalL2: the upper and lower parameter dicts share no name; name the "
                    "coupled parameters identically at both levels or pass names=[...]"
                )
            check_coupled(upper, lower, names, "ProximalL2")
            return names
        missing_upper = [n for n in self.names if n not in upper]
        missing_lower = [n for n in self.names if n not in lower]
        if missing_upper or missing_lower:
            raise KeyError(
                "ProximalL2: coupled parameters must exist at both levels under the same name; "
                f"missing in the upper dict: {missing_upper[:5]}, missing in the lower dict: "
                f"{missing_lower[:5]}"
            )
        check_coupled(upper, lower, self.names, "ProximalL2")
        return self.names

    def value(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
        """``½‖θ_D − θ_P‖²``."""
        names = self.coupled_names(upper, lower)
        norms = torch._foreach_norm(torch._foreach_sub([upper[n] for n in names],
                                                        [lower[n] for n in names]))
        return 0.5 * torch.stack(norms).square().sum()

    def lower_grad(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Params:
        """``θ_P − θ_D``."""
        names = self.coupled_names(upper, lower)
        return tree_sub({n: lower[n] for n in names}, upper)

    def lower_hvp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], z: Mapping[str, Tensor]
    ) -> Params:
        """``z`` on the coupled names (the identity block)."""
        # Called once per solver iteration: the coupling was validated when the solve was set
        # up, so only select the names here.
        names = self.names if self.names is not None else [n for n in z if n in upper]
        return {n: z[n] for n in names if n in z}

    def mixed_vjp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], u: Mapping[str, Tensor]
    ) -> Params:
        """``−u`` on the coupled names."""
        names = self.coupled_names(upper, lower)
        return dict(zip([n for n in names if n in u],
                        torch._foreach_neg([u[n] for n in names if n in u])))


class Regularizer(BaseRegularizer):
    """A general coupling ``r(x, y)``, differentiated with ``torch.func`` (eq. 3.3).

    Args:
        fn: ``fn(upper, lower) -> scalar``, twice differentiable in ``lower`` and differentiable in
            ``upper``; both arguments are parameter dicts.
        lower_names: the lower variables ``fn`` depends on; ``None`` means all of them.
        uses_batch: ``fn(upper, lower, batch)`` reads the lower batch (a data-dependent coupling
            such as appendix G's ``L^P(θ_D, φ_P)``); :class:`~implicitbilevel.BilevelProblem`
            binds it to the batch of each lower step and of each :meth:`lower_hessian`.

    ``fn`` and its derivatives run as the Hessian-vector products do: modules wrapped by
    :func:`~implicitbilevel.functional_module` on copies of their running statistics.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> def r(x, y):                                  # r = s/2 ||y||^2, s an upper variable
        ...     return 0.5 * x["s"] * (y["w"] ** 2).sum()
        >>> reg = ib.Regularizer(r, ["w"])
        >>> x = {"s": torch.tensor(3.0, dtype=torch.float64)}
        >>> y = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
        >>> float(reg.value(x, y)), reg.lower_grad(x, y)["w"].tolist()   # 7.5, s y
        (7.5, [3.0, -6.0])
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        lower_names: Iterable[str] | None = None,
        *,
        uses_batch: bool = False,
    ) -> None:
        self.lower_names = None if lower_names is None else name_list(lower_names, "lower_names")
        self.uses_batch = bool(uses_batch)
        self.batch_fn = fn if uses_batch else None
        self.fn = _unbound if uses_batch else fn

    def bind(self, batch: Any) -> BaseRegularizer:
        """``r`` at ``batch`` when it reads the lower batch (``uses_batch``), else itself."""
        if not self.uses_batch:
            return self
        if batch is None:
            raise ValueError("this Regularizer reads the lower batch (uses_batch=True) but none "
                             "was given: pass lower_batch or a lower_hessian built on one")
        batch_fn = self.batch_fn
        return Regularizer(lambda upper, lower: batch_fn(upper, lower, batch),  # type: ignore[misc]
                           self.lower_names)

    def coupled_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """``lower_names``, or every lower name."""
        if self.lower_names is None:
            return list(lower)
        missing = [n for n in self.lower_names if n not in lower]
        if missing:
            raise KeyError(f"Regularizer: lower_names {missing[:5]} are not lower-level variables")
        return self.lower_names

    def _lower_fn(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Callable:
        def fn(sub: Mapping[str, Tensor]) -> Tensor:
            return self.fn(upper, {**lower, **sub})

        return fn

    def value(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
        """``r(x, y)``."""
        with _hvp_context():
            return self.fn(upper, lower)

    def lower_grad(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Params:
        """``∇_y r`` by ``torch.func.grad``."""
        names = self.coupled_names(upper, lower)
        sub = {n: lower[n].detach() for n in names}
        with torch.no_grad(), _hvp_context():
            return torch.func.grad(self._lower_fn(upper, lower))(sub)

    def lower_hvp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], z: Mapping[str, Tensor]
    ) -> Params:
        """``∇²_yy r · z`` by the HVP engine, over the coupled names present in ``z``."""
        names = [n for n in self.coupled_names(upper, lower) if n in z]
        sub = {n: lower[n].detach() for n in names}
        return hvp(self._lower_fn(upper, lower), sub, {n: z[n] for n in names})

    def mixed_vjp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], u: Mapping[str, Tensor]
    ) -> Params:
        """``∇_x ⟨∇_y r(x, y), u⟩`` by nesting ``torch.func.grad``."""
        names = [n for n in self.coupled_names(upper, lower) if n in u]
        sub = {n: lower[n].detach() for n in names}
        x = {n: p.detach() for n, p in upper.items()}

        def directional(xx: Mapping[str, Tensor]) -> Tensor:
            g = torch.func.grad(lambda s: self.fn(xx, {**lower, **s}))(sub)
            return sum((g[n] * u[n]).sum() for n in names)

        with torch.no_grad(), _hvp_context():
            return torch.func.grad(directional)(x)


def _unbound(upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
    raise ValueError("this Regularizer reads the lower batch (uses_batch=True): call "
                     ".bind(batch) first (BilevelProblem does so)")


def _accumulate(parts: list[Params]) -> Params:
    out: Params = {}
    for part in parts:
        for n, t in part.items():
            out[n] = t if n not in out else out[n] + t
    return out


class SumRegularizer(BaseRegularizer):
    """``r(x, y) = Σ_k r_k(x, y)``.

    Args:
        *terms: the regularisers summed; their coupled names are united (in order of first
            appearance).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> both = ib.SumRegularizer(ib.ProximalL2(["w"]),
        ...                          ib.Regularizer(lambda x, y: (y["w"] ** 2).sum(), ["w"]))
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> float(both.value(x, y)), both.lower_grad(x, y)["w"].tolist()   # 1 + 2; y + 2y
        (3.0, [3.0, 3.0])
    """

    def __init__(self, *terms: BaseRegularizer) -> None:
        if not terms:
            raise ValueError("SumRegularizer needs at least one term")
        for term in terms:
            if not isinstance(term, BaseRegularizer):
                raise TypeError(f"SumRegularizer terms must be regularisers, got "
                                f"{type(term).__name__}")
        self.terms = list(terms)

    def bind(self, batch: Any) -> BaseRegularizer:
        """Every term at the lower batch ``batch``."""
        return SumRegularizer(*(term.bind(batch) for term in self.terms))

    def coupled_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """The union of the terms' coupled names."""
        return list(dict.fromkeys(n for term in self.terms
                                  for n in term.coupled_names(upper, lower)))

    def value(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
        """``Σ_k r_k(x, y)``."""
        return torch.stack([term.value(upper, lower) for term in self.terms]).sum()

    def lower_grad(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Params:
        """``Σ_k ∇_y r_k``."""
        return _accumulate([term.lower_grad(upper, lower) for term in self.terms])

    def lower_hvp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], z: Mapping[str, Tensor]
    ) -> Params:
        """``Σ_k ∇²_yy r_k · z`` (each term over its coupled names present in ``z``)."""
        return self._restricted_sum("lower_hvp", upper, lower, z)

    def mixed_vjp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], u: Mapping[str, Tensor]
    ) -> Params:
        """``Σ_k ∇_x ⟨∇_y r_k, u⟩`` (each term over its coupled names present in ``u``)."""
        return self._restricted_sum("mixed_vjp", upper, lower, u)

    def _restricted_sum(self, method: str, upper: Mapping[str, Tensor],
                        lower: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> Params:
        """``Σ_k term_k.method(upper, lower, v restricted to term_k's coupled names)``, skipping
        the terms none of whose names are in ``v``."""
        parts = []
        for term in self.terms:
            names = [n for n in term.coupled_names(upper, lower) if n in v]
            if names:
                parts.append(getattr(term, method)(upper, lower, {n: v[n] for n in names}))
        return _accumulate(parts)

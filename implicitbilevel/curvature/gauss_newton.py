"""Generalised Gauss–Newton curvature of a loss composed with a model's outputs.

When the loss factors through the model's outputs ``z = outputs(θ, batch)`` (e.g. the logits) as
``ℓ(θ) = L(z(θ))`` with ``L = output_loss(·, batch)`` convex in ``z`` (cross-entropy over logits,
squared error), the generalised Gauss–Newton matrix (Schraudolph 2002; Martens 2010) is

.. math:: G = J^\\top \\big(\\nabla^2_z L\\big) J, \\qquad J = \\partial z / \\partial \\theta,

the Hessian ``∇²ℓ = G + Σ_i (∂L/∂z_i) ∇²_θ z_i`` without its second term, the curvature of the
model itself. For convex ``L`` the output-space Hessian is positive semi-definite, hence so is
``G``: ``vᵀ G v = (J v)ᵀ ∇²_z L (J v) ≥ 0``. So ``I + G/μ`` is positive definite for every
``μ > 0`` and conjugate gradients on the implicit system converges however non-convex ``ℓ`` is,
where the exact Hessian can have negative eigenvalues and leave ``I + H/μ`` indefinite. ``G = H``
when ``z`` is linear in ``θ``.

Products ``G t = Jᵀ (∇²_z L (J t))`` never form ``G`` or ``J``. ``z`` is computed with its graph;
``Jᵀ s`` is one backward pass through that graph and ``∇²_z L`` is applied through a kept
first-order graph of ``L`` in ``z`` (the size of the outputs: negligible). ``J t`` comes, by mode:

``"forward-over-reverse"``
    from ``torch.func.jvp`` of ``outputs``: one forward pass carrying tangents (the primal
    forward runs again alongside them), under the random-number state and BatchNorm handling of
    the pass that built ``z``, so it differentiates exactly the function whose graph is kept. A
    product costs one forward pass with tangents and one backward pass.
``"reverse-over-reverse"``
    by the double-vjp trick: ``g(w) = Jᵀ w`` is built once through ``z``'s graph for a dummy
    cotangent ``w`` (``create_graph=True``; ``g`` is linear in ``w``, so ``w``'s value does not
    matter) and ``J t = ∂⟨g(w), t⟩/∂w`` is one backward pass through ``g``'s graph. A product
    costs two backward passes and no forward pass, but the first runs through double-backward
    formulas (cheap for linear layers and pointwise functions, dear for BatchNorm) and ``g``'s
    graph stays alive as well. Works for every op with a double-backward formula, legacy
    ``autograd.Function`` subclasses included.
``"auto"`` (default)
    forward mode, falling back to the double-vjp trick for good (with a one-time
    ``RuntimeWarning`` naming the reason) when the forward-mode pass fails, e.g. for an op
    without a forward-mode rule.

With ``reuse=True`` (default) ``z``'s graph is built once and kept for every product; with
``reuse=False`` every product builds it anew (one more forward pass). Which ``J t`` is cheaper
depends on the model. On CPU (batch 64 of 32×32 images) a kept-graph product on a two-conv
BatchNorm net took 0.65-0.8 of the time in forward mode that it took by double-vjp (and about 0.7
of the exact Hessian's kept-graph product); on a tanh MLP without BatchNorm forward mode took
1.6-1.9 times as long, so ``"reverse-over-reverse"`` is the better choice there.

As in :mod:`implicitbilevel.hessian`, BatchNorm modules wrapped by
:func:`~implicitbilevel.hessian.functional_module` run on copies of their running statistics (which
stay untouched), attention runs under the MATH kernel, and every forward pass of the operator after
the first restores the random-number state at construction (leaving the caller's stream where it
was), so dropout masks are the same in all products and equal to those of the kept graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import HVPModeError
from ..tree import Params
from .base import (
    CurvatureOperator,
    RNGPin,
    check_scalar,
    lacks_forward_ad,
    quiet_forward_ad,
    warn_mode_fallback,
    zero_product,
)
from .hessian import _MODES, HVPMode, _hvp_context, _warning_key

__all__ = ["GaussNewton", "GaussNewtonOperator"]

_FALLBACK_WARNED: set[tuple[int, str]] = set()


def _check_outputs(z: Any) -> Tensor:
    if not isinstance(z, Tensor) or not z.is_floating_point():
        kind = f"a {z.dtype} tensor" if isinstance(z, Tensor) else f"a {type(z).__name__}"
        raise TypeError(
            f"outputs must return one floating-point Tensor (e.g. the logits), got {kind}; "
            "return the tensor the output loss is convex in"
        )
    return z


class _OutputCurvature:
    """``v ↦ ∇²_z L v`` at ``z``, through a kept first-order graph of ``output_loss`` in ``z``."""

    def __init__(self, output_loss: Callable[..., Tensor], z: Tensor, args: tuple) -> None:
        with torch.enable_grad():
            self.z = z.detach().requires_grad_(True)
            loss = output_loss(self.z, *args)
            check_scalar(loss)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, self.z, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        # A loss linear in z (or independent of it) has no output-space curvature.
        self.grad = grad if grad is not None and grad.requires_grad else None

    def product(self, v: Tensor, batched: bool) -> Tensor:
        if self.grad is None:
            return torch.zeros_like(v)
        (s,) = torch.autograd.grad(
            self.grad, self.z, grad_outputs=v, retain_graph=True, allow_unused=True,
            is_grads_batched=batched,
        )
        return torch.zeros_like(v) if s is None else s


class _GaussNewtonGraph:
    """``z(θ)`` with its graph; ``G t`` with ``J t`` formed in ``mode`` (module docstring).

    ``pin`` restores the random-number state under which ``z`` was computed, so the forward-mode
    pass draws the dropout masks of the kept graph. ``mode`` turns from ``"auto"`` into
    ``"reverse-over-reverse"`` when forward mode fails.
    """

    def __init__(
        self, outputs: Callable[..., Tensor], output_loss: Callable[..., Tensor], params: Params,
        args: tuple, mode: str, pin: RNGPin,
    ) -> None:
        self.names = list(params.keys())
        self.params, self.mode, self._outputs, self._args, self._pin = (
            params, mode, outputs, args, pin
        )
        with torch.enable_grad(), _hvp_context():
            self.leaves = [p.detach().requires_grad_(True) for p in params.values()]
            self.z = _check_outputs(outputs(dict(zip(self.names, self.leaves)), *args))
            self.curvature = _OutputCurvature(output_loss, self.z, args)
        self.loss = self.curvature.loss
        self._jtw: tuple[Tensor, list[int], list[Tensor]] | None = None  # (w, used, g(w))

    def _forward_jt(self, tangent: Params, k: int | None) -> Tensor:
        def jvp(t: Params) -> Tensor:
            return torch.func.jvp(lambda p: self._outputs(p, *self._args), (self.params,), (t,))[1]

        with torch.no_grad(), self._pin(), quiet_forward_ad():
            if k is None:
                return jvp(tangent)
            # randomness="same": the primal pass is not batched, so dropout draws the single
            # product's mask from the (pinned) generator, once for all k tangents.
            return torch.func.vmap(jvp, randomness="same")(tangent)

    def _double_vjp_jt(self, tangent: Params, k: int | None) -> Tensor:
        if self._jtw is None:
            with torch.enable_grad():
                w = torch.zeros_like(self.z, requires_grad=True)
                jtw = torch.autograd.grad(
                    self.z, self.leaves, grad_outputs=w, create_graph=True, allow_unused=True
                )
            # g_i(w) = J_iᵀ w is linear in w: an entry that does not depend on w is J_i = 0.
            used = [i for i, g in enumerate(jtw) if g is not None and g.requires_grad]
            self._jtw = w, used, [jtw[i] for i in used]
        w, used, jtw = self._jtw
        if not used:
            return zero_product(self.z.detach(), k)
        (jt,) = torch.autograd.grad(
            jtw, w, grad_outputs=[tangent[self.names[i]] for i in used], retain_graph=True,
            is_grads_batched=k is not None,
        )
        return jt

    def _jt(self, tangent: Params, k: int | None) -> Tensor:
        if self.mode == "reverse-over-reverse":
            return self._double_vjp_jt(tangent, k)
        try:
            return self._forward_jt(tangent, k)
        except (RuntimeError, NotImplementedError) as err:
            if k is not None and not lacks_forward_ad(err):
                raise  # e.g. no batching rule: batched() computes the products one at a time
            if self.mode == "forward-over-reverse":
                if not lacks_forward_ad(err):
                    raise
                raise HVPModeError(
                    "an operation in the outputs has no forward-mode AD rule, so the "
                    "'forward-over-reverse' Gauss-Newton product cannot run; use "
                    f"mode='reverse-over-reverse' or mode='auto'. Original error: {err}"
                ) from err
            fallback = err
        # Not every forward-mode failure says so: try the double-vjp trick, and if that fails
        # too its error is the one that describes the model.
        jt = self._double_vjp_jt(tangent, k)
        self.mode = "reverse-over-reverse"
        key = _warning_key(self._outputs)
        warn_mode_fallback(_FALLBACK_WARNED, key, "Gauss-Newton product", fallback)
        return jt

    def product(
        self, tangent: Mapping[str, Tensor], retain_graph: bool, k: int | None = None
    ) -> Params:
        """``G t``; with ``k``, ``tangent`` is batched (``k`` stacked) and so is the result."""
        out = {n: zero_product(p, k) for n, p in zip(self.names, self.leaves)}
        if not self.z.requires_grad or self.curvature.grad is None:
            return out
        with _hvp_context():
            s = self.curvature.product(self._jt(dict(tangent), k), batched=k is not None)
            products = torch.autograd.grad(
                self.z, self.leaves, grad_outputs=s, retain_graph=retain_graph,
                allow_unused=True, is_grads_batched=k is not None,
            )
        out.update({n: p.detach() for n, p in zip(self.names, products) if p is not None})
        return out


class GaussNewtonOperator(CurvatureOperator):
    """The linear map ``t ↦ Jᵀ ∇²_z L J t`` at a fixed point and batch (see the module docstring).

    The same interface as :class:`~implicitbilevel.hessian.HessianOperator`, so either can serve as
    the curvature of the lower level; this one is positive semi-definite (:attr:`psd` is ``True``)
    when ``output_loss`` is convex in the outputs.

    Args:
        outputs: ``outputs(params, *args) -> Tensor``, the model outputs ``z`` (e.g. the logits).
        output_loss: ``output_loss(z, *args) -> scalar tensor``, convex in ``z``.
        params: the point, ``{name: Tensor}``; ``J`` is taken with respect to these names.
        *args: further arguments of both functions (the batch), held fixed.
        mode: how ``J t`` is formed, with or without ``reuse``: ``"auto"``,
            ``"forward-over-reverse"`` (forward mode, one forward pass with tangents per product)
            or ``"reverse-over-reverse"`` (the double-vjp trick, one double backward per product).
        reuse: keep the graph of ``z`` (and, by double-vjp, that of ``Jᵀ w``) and answer every
            product through it, at the memory of those graphs. ``False`` rebuilds it per product.

    Attributes:
        names: the parameter names, in order.
        params: the point, ``{name: Tensor}`` detached (do not modify it in place).
        loss: ``L(z(params))`` at the point (kept-graph mode only; ``None`` otherwise).
        calls: number of products evaluated so far (a batched call of ``k`` tangents counts ``k``).
        mode: the mode in use: ``"kept-graph"`` when ``reuse=True``; otherwise the ``mode`` given,
            ``"auto"`` turning into ``"reverse-over-reverse"`` if forward mode fails.
        psd: ``True``.
        memo: an empty dict at construction, for callers to cache what is derived from this one
            operator (e.g. a low-rank approximation shared by several solves).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> X = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        >>> G = ib.GaussNewtonOperator(lambda p: X @ p["w"], lambda z: 0.5 * (z ** 2).sum(),
        ...                            {"w": torch.zeros(2, dtype=torch.float64)})
        >>> t = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
        >>> torch.allclose(G(t)["w"], X.T @ X @ t["w"])                   # J^T J t with J = X
        True
    """

    psd = True

    def __init__(
        self,
        outputs: Callable[..., Tensor],
        output_loss: Callable[..., Tensor],
        params: Mapping[str, Tensor],
        *args: Any,
        mode: HVPMode = "auto",
        reuse: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        super().__init__(params)
        self._outputs = outputs
        self._output_loss = output_loss
        self._args = args
        # Captured before the kept graph's forward pass, whose dropout masks every later forward
        # pass (forward-mode products, rebuilt graphs) draws again.
        self._pin = RNGPin(self.params.values())
        self.mode = mode
        if reuse:
            self.mode = "kept-graph"
            self._graph = self._build(mode)
            self.loss = self._graph.loss

    def _build(self, mode: str) -> _GaussNewtonGraph:
        return _GaussNewtonGraph(
            self._outputs, self._output_loss, self.params, self._args, mode, self._pin
        )

    def _product(self, tangent: Params, k: int | None = None) -> Params:
        if self.mode == "kept-graph":
            return self._graph.product(tangent, retain_graph=True, k=k)
        with self._pin():
            graph = self._build(self.mode)
        product = graph.product(tangent, retain_graph=False, k=k)
        self.mode = graph.mode
        return product

    def _warning_key(self) -> tuple[int, str]:
        return _warning_key(self._outputs)


@dataclass(frozen=True)
class GaussNewton:
    """A loss ``ℓ(p, *args) = output_loss(outputs(p, *args), *args)`` with ``output_loss`` convex
    in the outputs, whose curvature is the generalised Gauss–Newton matrix ``Jᵀ ∇²_z L J``.

    Args:
        outputs: ``outputs(params, *args) -> Tensor``, the model outputs ``z`` (e.g. the logits).
        output_loss: ``output_loss(z, *args) -> scalar tensor``, convex in ``z`` (cross-entropy
            over logits, squared error).

    Calling the object evaluates the composed loss, so it also serves where a plain loss function
    is expected (e.g. as ``fn`` of a :class:`~implicitbilevel.hessian.HessianOperator`).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
        >>> gn = ib.GaussNewton(lambda p: torch.tanh(X @ p["w"]),
        ...                     lambda z: 0.5 * ((z - y) ** 2).sum())
        >>> w = {"w": torch.tensor([0.3, -0.2], dtype=torch.float64)}
        >>> float(gn(w)) == float(0.5 * ((torch.tanh(X @ w["w"]) - y) ** 2).sum())
        True
        >>> J = (1 - torch.tanh(X @ w["w"]) ** 2)[:, None] * X       # Jacobian of the outputs
        >>> G = ib.GaussNewtonOperator(gn.outputs, gn.output_loss, w)
        >>> torch.allclose(G.batched({"w": torch.eye(2, dtype=torch.float64)})["w"], J.T @ J)
        True
    """

    outputs: Callable[..., Tensor]
    output_loss: Callable[..., Tensor]

    def loss(self, params: Mapping[str, Tensor], *args: Any) -> Tensor:
        """Return ``output_loss(outputs(params, *args), *args)``."""
        return self.output_loss(self.outputs(params, *args), *args)

    def __call__(self, params: Mapping[str, Tensor], *args: Any) -> Tensor:
        return self.loss(params, *args)

    def operator(
        self, params: Mapping[str, Tensor], *args: Any, mode: HVPMode = "auto", reuse: bool = True
    ) -> GaussNewtonOperator:
        """Return the :class:`GaussNewtonOperator` of this loss at ``params`` and ``args``."""
        return GaussNewtonOperator(
            self.outputs, self.output_loss, params, *args, mode=mode, reuse=reuse
        )

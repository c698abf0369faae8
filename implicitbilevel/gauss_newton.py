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

Products ``G t = Jᵀ (∇²_z L (J t))`` never form ``G`` or ``J``:

kept graph (``reuse=True``, default)
    ``z`` is computed once with its graph, together with ``g(w) = Jᵀ w`` for a dummy cotangent
    ``w`` (``create_graph=True``; ``g`` is linear in ``w``). Each product is one backward pass
    through ``g``'s graph for ``J t = ∂⟨g(w), t⟩/∂w`` (the double-vjp trick, no new forward pass),
    one product with ``∇²_z L`` through the kept first-order graph of ``L`` in ``z`` (the size of
    the outputs: negligible) and one backward pass through ``z``'s graph for ``Jᵀ s``: about two
    backward passes per product.
``reuse=False``
    every product re-runs the model: ``"forward-over-reverse"`` takes ``J t`` from
    ``torch.func.jvp`` and ``Jᵀ s`` from ``torch.func.vjp`` (two forward passes, one with
    tangents, and one backward pass); ``"reverse-over-reverse"`` builds the kept-graph pieces
    above for the one product; ``"auto"`` tries the first and falls back to the second (with a
    one-time warning) when forward mode fails.

As in :mod:`implicitbilevel.hessian`, BatchNorm modules wrapped by
:func:`~implicitbilevel.hessian.functional_module` run on copies of their running statistics (which
stay untouched), attention runs under the MATH kernel, and without ``reuse`` the random-number state
at construction is restored for every forward pass, so dropout masks are the same in all products.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._products import (
    RNGPin,
    check_batched_tangents,
    check_scalar,
    check_tangent,
    empty_batch,
    lacks_forward_ad,
    loop_products,
    quiet_forward_ad,
    warn_mode_fallback,
    zeros_batch,
)
from .hessian import _MODES, HVPMode, HVPModeError, _hvp_context, _warning_key
from .tree import Params

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


def _zeros(like: Tensor, k: int | None) -> Tensor:
    return torch.zeros_like(like) if k is None else zeros_batch(k, like)


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
    """``z(θ)`` with its graph and ``g(w) = Jᵀ w`` with its graph, for products by backward passes.

    ``J t = ∂⟨g(w), t⟩/∂w`` is one backward pass through ``g``'s graph (``g`` is linear in ``w``,
    so the value of the dummy ``w`` does not matter), ``Jᵀ s`` one backward pass through ``z``'s.
    """

    def __init__(
        self, outputs: Callable[..., Tensor], output_loss: Callable[..., Tensor], params: Params,
        args: tuple,
    ) -> None:
        self.names = list(params.keys())
        with torch.enable_grad(), _hvp_context():
            leaves = [p.detach().requires_grad_(True) for p in params.values()]
            self.z = _check_outputs(outputs(dict(zip(self.names, leaves)), *args))
            self.curvature = _OutputCurvature(output_loss, self.z, args)
            self.leaves = leaves
            self.used: list[int] = []
            if self.z.requires_grad:
                self.w = torch.zeros_like(self.z, requires_grad=True)
                jtw = torch.autograd.grad(
                    self.z, leaves, grad_outputs=self.w, create_graph=True, allow_unused=True
                )
                # g_i(w) = J_iᵀ w is linear in w: an entry that does not depend on w is J_i = 0.
                self.used = [i for i, g in enumerate(jtw) if g is not None and g.requires_grad]
                self.jtw = [jtw[i] for i in self.used]
        self.loss = self.curvature.loss

    def product(
        self, tangent: Mapping[str, Tensor], retain_graph: bool, k: int | None = None
    ) -> Params:
        """``G t``; with ``k``, ``tangent`` is batched (``k`` stacked) and so is the result."""
        if not self.used or self.curvature.grad is None:
            return {n: _zeros(p, k) for n, p in zip(self.names, self.leaves)}
        batched = k is not None
        used = [self.leaves[i] for i in self.used]
        with _hvp_context():
            (jt,) = torch.autograd.grad(
                self.jtw, self.w, grad_outputs=[tangent[self.names[i]] for i in self.used],
                retain_graph=True, is_grads_batched=batched,
            )
            s = self.curvature.product(jt, batched)
            products = torch.autograd.grad(
                self.z, used, grad_outputs=s, retain_graph=retain_graph, is_grads_batched=batched
            )
        out = {n: _zeros(p, k) for n, p in zip(self.names, self.leaves)}
        out.update({self.names[i]: p.detach() for i, p in zip(self.used, products)})
        return out


def _forward_product(
    f: Callable[[Params], Tensor], output_loss: Callable[..., Tensor], params: Params,
    tangent: Params, args: tuple, k: int | None,
) -> Params:
    """``G t`` with ``J t`` from ``torch.func.jvp`` and ``Jᵀ s`` from ``torch.func.vjp``."""
    z, vjp_fn = torch.func.vjp(f, params)
    curvature = _OutputCurvature(output_loss, _check_outputs(z), args)

    def jvp(t: Params) -> Tensor:
        return torch.func.jvp(f, (params,), (t,))[1]

    with quiet_forward_ad():
        if k is None:
            (product,) = vjp_fn(curvature.product(jvp(tangent), batched=False))
        else:
            # randomness="same": the primal pass is not batched, so dropout draws the single
            # product's mask from the (pinned) generator, once for all k tangents.
            jt = torch.func.vmap(jvp, randomness="same")(tangent)
            (product,) = torch.func.vmap(vjp_fn)(curvature.product(jt, batched=True))
    return {n: product[n].detach() for n in params}


class GaussNewtonOperator:
    """The linear map ``t ↦ Jᵀ ∇²_z L J t`` at a fixed point and batch (see the module docstring).

    The same interface as :class:`~implicitbilevel.hessian.HessianOperator`, so either can serve as
    the curvature of the lower level; this one is positive semi-definite (:attr:`psd` is ``True``)
    when ``output_loss`` is convex in the outputs.

    Args:
        outputs: ``outputs(params, *args) -> Tensor``, the model outputs ``z`` (e.g. the logits).
        output_loss: ``output_loss(z, *args) -> scalar tensor``, convex in ``z``.
        params: the point, ``{name: Tensor}``; ``J`` is taken with respect to these names.
        *args: further arguments of both functions (the batch), held fixed.
        mode: ``"auto"``, ``"forward-over-reverse"`` (``J t`` by forward mode) or
            ``"reverse-over-reverse"`` (``J t`` by the double-vjp trick), used when ``reuse=False``.
        reuse: keep the graphs of ``z`` and of ``Jᵀ w`` and answer every product with backward
            passes through them (about two per product), at the memory of those graphs.

    Attributes:
        names: the parameter names, in order.
        params: the point, ``{name: Tensor}`` detached (do not modify it in place).
        loss: ``L(z(params))`` at the point (kept-graph mode only; ``None`` otherwise).
        calls: number of products evaluated so far (a batched call of ``k`` tangents counts ``k``).
        mode: the mode in use (``"kept-graph"`` when ``reuse=True``).
        psd: ``True``.
        memo: an empty dict at construction, for callers to cache what is derived from this one
            operator (e.g. a low-rank approximation shared by several solves).
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
        self._outputs = outputs
        self._output_loss = output_loss
        self._args = args
        self.names = list(params.keys())
        self.calls = 0
        self.loss: Tensor | None = None
        self.memo: dict[Any, Any] = {}
        self.params = {n: p.detach() for n, p in params.items()}
        if reuse:
            self.mode = "kept-graph"
            self._graph = _GaussNewtonGraph(outputs, output_loss, self.params, args)
            self.loss = self._graph.loss
        else:
            self.mode = mode
            self._pin = RNGPin(self.params.values())

    def _pinned_outputs(self, p: Params) -> Tensor:
        # Every forward pass of a product (the jvp and the vjp pass) draws the same dropout mask.
        with self._pin():
            return self._outputs(p, *self._args)

    def _evaluate(self, tangent: Params, k: int | None) -> Params:
        with torch.no_grad(), _hvp_context():
            if self.mode != "reverse-over-reverse":
                try:
                    return _forward_product(
                        self._pinned_outputs, self._output_loss, self.params, tangent,
                        self._args, k,
                    )
                except (RuntimeError, NotImplementedError) as err:
                    if self.mode == "forward-over-reverse":
                        if not lacks_forward_ad(err):
                            raise
                        raise HVPModeError(
                            "an operation in the outputs has no forward-mode AD rule, so the "
                            "'forward-over-reverse' Gauss-Newton product cannot run; use "
                            f"mode='reverse-over-reverse' or mode='auto'. Original error: {err}"
                        ) from err
                    fallback = err
            with self._pin():
                graph = _GaussNewtonGraph(self._outputs, self._output_loss, self.params,
                                          self._args)
            product = graph.product(tangent, retain_graph=False, k=k)
            if self.mode == "auto":
                # Only after the reverse-only product succeeded: if it fails too, its error is
                # the one that describes the model.
                self.mode = "reverse-over-reverse"
                key = _warning_key(self._outputs)
                warn_mode_fallback(_FALLBACK_WARNED, key, "Gauss-Newton product", fallback)
            return product

    def _product(self, tangent: Params, k: int | None = None) -> Params:
        if self.mode == "kept-graph":
            return self._graph.product(tangent, retain_graph=True, k=k)
        return self._evaluate(tangent, k)

    def __call__(self, tangent: Mapping[str, Tensor]) -> Params:
        """Return ``G @ tangent`` as a dict with the operator's parameter names."""
        check_tangent(self.params, tangent)
        self.calls += 1
        return self._product(dict(tangent))

    def batched(self, tangents: Mapping[str, Tensor]) -> Params:
        """Return ``[G t_1, ..., G t_k]`` stacked: ``out[name][i] = (G t_i)[name]``.

        Args:
            tangents: every entry of shape ``(k, *params[name].shape)``, the same ``k`` for all.

        Equal to ``k`` calls of the operator (and counted as ``k`` in :attr:`calls`): the backward
        passes run with ``is_grads_batched=True``, the forward-mode pass under ``torch.func.vmap``.
        When the vectorised pass raises (an operation without a batching rule) the products are
        computed one at a time, with a one-time ``RuntimeWarning`` that names the reason.
        """
        k = check_batched_tangents(self.params, tangents)
        if k == 0:
            return empty_batch(self.params)
        tangents = dict(tangents)
        try:
            product = self._product(tangents, k)
        except (RuntimeError, NotImplementedError) as err:
            product = loop_products(self._product, tangents, k, _warning_key(self._outputs), err)
        self.calls += k
        return product


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

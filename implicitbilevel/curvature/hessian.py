"""Hessian-vector products of a scalar loss at a parameter dict, on ``torch.func``.

A loss is a pure function ``fn(params, *args) -> scalar`` of a parameter dict (see
:func:`functional_module` to turn an ``nn.Module`` into one). For a tangent dict ``t`` with the
names of ``params`` the Hessian-vector product is (thesis eq. 3.5)

.. math:: H t = \\nabla_\\theta \\big[ \\nabla_\\theta \\ell(\\theta)^\\top t \\big],

computed without ever forming ``H``. Three ways are offered:

``"forward-over-reverse"``
    ``jvp(grad(fn))``: one forward-mode pass through the gradient computation. Needs a
    forward-mode rule for every op; the least memory.
``"reverse-over-reverse"``
    double backward through autograd (``create_graph=True``). Works for every op with a
    double-backward formula, legacy ``autograd.Function`` subclasses included.
``"auto"`` (default)
    forward-over-reverse, falling back to reverse-over-reverse (with a one-time warning) when the
    forward-mode pass fails, e.g. for an op without a forward-mode rule.

When the point and the batch stay fixed over many products, as over the iterations of a
conjugate-gradient solve and, in BiSSL, over all upper-level steps of an alternation,
:class:`HessianOperator` with ``reuse=True`` (the default) builds the gradient graph once with
``create_graph=True`` and answers every product with one backward pass through that kept graph.
Measured on CPU (``benchmarks/results/quick-cpu.md``), a product costs 1.67x a gradient on a
ResNet-18 instead of 2.78x (reverse-over-reverse) or 3.31x (forward-over-reverse), and 2.01x
instead of 2.94x or 4.19x on a small GPT. The price is memory: the first-order graph, about two
to three times the activation memory of one training step, stays alive until the operator is
dropped.

:meth:`HessianOperator.batched` answers ``k`` tangents stacked along a leading dimension at once:
one backward pass with ``is_grads_batched=True`` through the kept graph, or one ``torch.func.vmap``
of the product in the chosen mode, with the ``k`` products stacked the same way.

Two hazards of differentiating real models are handled here:

- **BatchNorm.** Inside every Hessian-vector product, modules wrapped by :func:`functional_module`
  run with *copies* of their running statistics, so batch statistics are used (train mode) and the
  module's own running statistics are left untouched.
- **Attention kernels.** The flash and memory-efficient ``scaled_dot_product_attention`` kernels
  have neither forward-mode AD nor double backward; every product here runs under the MATH kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import HVPModeError
from ..tree import Params
from .base import (
    CurvatureOperator,
    RNGPin,
    check_scalar,
    check_tangent,
    lacks_forward_ad,
    quiet_forward_ad,
    warn_mode_fallback,
    zero_product,
)

__all__ = [
    "HVPMode",
    "HVPModeError",
    "HessianOperator",
    "functional_module",
    "hvp",
    "in_hvp",
]

HVPMode = Literal["auto", "forward-over-reverse", "reverse-over-reverse"]
_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")

_IN_HVP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "implicitbilevel_in_hvp", default=False
)
_FALLBACK_WARNED: set[tuple[int, str]] = set()


def in_hvp() -> bool:
    """Return ``True`` while a Hessian-vector product of this library is being evaluated.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> seen = []
        >>> def f(p):
        ...     seen.append(ib.in_hvp())
        ...     return (p["w"] ** 2).sum()
        >>> w = {"w": torch.ones(2, dtype=torch.float64)}
        >>> _ = ib.hvp(f, w, w)
        >>> ib.in_hvp(), any(seen)
        (False, True)
    """
    return _IN_HVP.get()


@contextlib.contextmanager
def _hvp_context() -> Iterator[None]:
    token = _IN_HVP.set(True)
    try:
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            yield
    finally:
        _IN_HVP.reset(token)


def _frozen_buffers(module: nn.Module) -> dict[str, Tensor | None]:
    # BatchNorm updates its running statistics in place, which torch.func forbids on a captured
    # tensor: copies of the float statistics absorb the update, and None for BatchNorm's counter
    # skips its increment. Every other buffer (position ids, attention masks) is passed as is.
    buffers: dict[str, Tensor | None] = {}
    for module_name, sub in module.named_modules():
        if not isinstance(sub, nn.modules.batchnorm._NormBase):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, buf in sub.named_buffers(recurse=False):
            buffers[prefix + name] = buf.clone() if buf.is_floating_point() else None
    return buffers


def functional_module(module: nn.Module, *, freeze_buffers: bool | None = None) -> Callable:
    """Return ``call(params, *args, **kwargs)`` evaluating ``module`` at the dict ``params``.

    ``params`` may hold any subset of the module's parameter names; the others keep the module's own
    tensors, so a loss can be differentiated with respect to (say) only the backbone without copying
    the model. Tied weights stay tied.

    Args:
        module: the model. Its train/eval mode is used as it is (train-mode BatchNorm uses batch
            statistics).
        freeze_buffers: ``True`` runs on copies of the buffers (running statistics unchanged),
            ``False`` on the module's own buffers (a train-mode BatchNorm updates them). ``None``
            (default) freezes inside this library's Hessian-vector products and nowhere else.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> net = torch.nn.Linear(2, 1).double()
        >>> call = ib.functional_module(net)
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> params = {"weight": torch.zeros(1, 2, dtype=torch.float64)}   # the bias keeps its value
        >>> torch.equal(call(params, x), net.bias.detach().reshape(1, 1))
        True
    """

    def call(params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        frozen = in_hvp() if freeze_buffers is None else freeze_buffers
        if frozen:
            return functional_call(module, (dict(params), _frozen_buffers(module)), args, kwargs)
        return functional_call(module, dict(params), args, kwargs)

    return call


def _forward_over_reverse(
    fn: Callable, params: Params, tangent: Params, args: tuple, k: int | None = None
) -> Params:
    def gradient(p: Params) -> Params:
        return torch.func.grad(fn)(p, *args)

    def product(t: Params) -> Params:
        return torch.func.jvp(gradient, (params,), (t,))[1]

    with quiet_forward_ad():
        if k is None:
            return product(tangent)
        # randomness="same": the primal pass is not batched, so dropout draws the single
        # product's mask from the (pinned) generator, once for all k tangents.
        return torch.func.vmap(product, randomness="same")(tangent)


class _FirstOrderGraph:
    """The gradient of ``fn`` at ``params`` with its graph kept, for double-backward products."""

    def __init__(self, fn: Callable, params: Params, args: tuple) -> None:
        with torch.enable_grad(), _hvp_context():
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            loss = fn(leaves, *args)
            grads = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
        self.loss = loss.detach()
        self.names = list(leaves.keys())
        self.leaves = list(leaves.values())
        # Only gradient entries that still depend on the parameters carry curvature; the others
        # (unused parameters, or ones the loss is linear in) contribute zero rows of the Hessian.
        self.curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.curved]

    def product(
        self, tangent: Mapping[str, Tensor], retain_graph: bool, k: int | None = None
    ) -> Params:
        """``H t`` by one backward pass; with ``k``, ``tangent`` is batched (``k`` stacked)."""
        if not self.grads:
            return {n: zero_product(p, k) for n, p in zip(self.names, self.leaves)}
        with _hvp_context():
            products = torch.autograd.grad(
                self.grads,
                self.leaves,
                grad_outputs=[tangent[self.names[i]] for i in self.curved],
                retain_graph=retain_graph,
                allow_unused=True,
                is_grads_batched=k is not None,
            )
        return {
            n: p.detach() if p is not None else zero_product(leaf, k)
            for n, p, leaf in zip(self.names, products, self.leaves)
        }


def _reverse_over_reverse(
    fn: Callable, params: Params, tangent: Params, args: tuple, k: int | None = None
) -> Params:
    # Plain autograd double backward rather than torch.func.vjp: it also runs legacy
    # autograd.Functions that functorch transforms reject, and its peak memory is lower.
    return _FirstOrderGraph(fn, params, args).product(tangent, retain_graph=False, k=k)


def _scalar_fn(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def checked(p: Params, *args: Any) -> Tensor:
        loss = fn(p, *args)
        check_scalar(loss)
        return loss

    return checked


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _warning_key(fn: Callable) -> tuple[int, str]:
    original = getattr(fn, "__wrapped__", fn)
    return id(original), _name(original)


def _evaluate(
    fn: Callable, params: Params, tangent: Params, args: tuple, mode: str, k: int | None = None,
    pin: RNGPin | None = None,
) -> tuple[Params, str]:
    """One product in ``mode`` (``k`` stacked ones for a batched ``tangent``); returns it and the
    mode actually used (``auto`` may fall back). With ``pin`` every attempt runs from the pinned
    random-number state, the fallback's retry included (its dropout masks are then those of the
    failed forward-mode pass and of every other product)."""
    with torch.no_grad(), _hvp_context(), _pinned(pin):
        if mode == "reverse-over-reverse":
            return _reverse_over_reverse(fn, params, tangent, args, k), mode
        try:
            return _forward_over_reverse(fn, params, tangent, args, k), "forward-over-reverse"
        except (RuntimeError, NotImplementedError) as err:
            if mode == "forward-over-reverse":
                if not lacks_forward_ad(err):
                    raise
                raise HVPModeError(
                    "an operation in the loss has no forward-mode AD rule, so the "
                    "'forward-over-reverse' HVP cannot run; use mode='reverse-over-reverse' or "
                    f"mode='auto'. Original error: {err}"
                ) from err
            # Not every forward-mode failure says so (torch 2.14's mse_loss raises "ZeroTensors
            # are immutable"): try double backward, and if that fails too its error is the
            # one that describes the loss.
            with _pinned(pin):
                product = _reverse_over_reverse(fn, params, tangent, args, k)
            warn_mode_fallback(_FALLBACK_WARNED, _warning_key(fn), "HVP", err)
            return product, "reverse-over-reverse"


def _pinned(pin: RNGPin | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if pin is None else pin()


def hvp(
    fn: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    tangent: Mapping[str, Tensor],
    *args: Any,
    mode: HVPMode = "auto",
) -> Params:
    """Return the Hessian-vector product ``∇²fn(params) @ tangent`` (thesis eq. 3.5).

    Args:
        fn: ``fn(params, *args) -> scalar tensor``, a pure function of the parameter dict.
        params: the point, ``{name: Tensor}``; the Hessian is taken with respect to these names.
        tangent: the vector, a dict with the same names and shapes.
        *args: further arguments of ``fn`` (the batch), held fixed.
        mode: ``"auto"``, ``"forward-over-reverse"`` or ``"reverse-over-reverse"``.

    Returns:
        A dict with the names of ``params``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> def f(p):                                    # f(w) = sum(w^3): Hessian diag(6 w)
        ...     return (p["w"] ** 3).sum()
        >>> w = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> t = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> ib.hvp(f, w, t)["w"].tolist()
        [6.0, 12.0]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    params = {n: p.detach() for n, p in params.items()}
    check_tangent(params, tangent)
    product, _ = _evaluate(_scalar_fn(fn), params, dict(tangent), args, mode)
    return product


class HessianOperator(CurvatureOperator):
    """The linear map ``t ↦ ∇²fn(params) t`` at a fixed point and batch, for repeated products.

    With ``reuse=True`` (default) the gradient is computed once with ``create_graph=True`` and each
    product is a single backward pass through that kept graph (reverse-over-reverse); see the module
    docstring for the speed and memory trade-off. The parameters must not be modified in place while
    the operator is alive: every product compares their version counters with those recorded at
    construction and raises a ``RuntimeError`` if one changed, in either mode.

    With ``reuse=False`` every product re-runs the loss in ``mode``. The random-number state at
    construction is restored for every product, and again for the reverse-over-reverse retry when
    ``"auto"`` falls back from a failed forward-mode pass, so dropout masks are identical across
    products and the operator stays one fixed symmetric matrix.

    :meth:`batched` answers ``k`` tangents at once: through the kept graph one backward pass with
    ``is_grads_batched=True``; without it one ``torch.func.vmap`` over the product in ``mode``.

    Args:
        fn: ``fn(params, *args) -> scalar tensor``.
        params: the point.
        *args: further arguments of ``fn`` (the batch).
        mode: the HVP mode when ``reuse=False``.
        reuse: keep the first-order graph and reuse it for every product.

    Attributes:
        names: the parameter names, in order.
        params: the point, ``{name: Tensor}`` detached (do not modify it in place).
        loss: the loss value at ``params`` (kept-graph mode only; ``None`` otherwise).
        calls: number of products evaluated so far (a batched call of ``k`` tangents counts ``k``).
        mode: the mode in use (``"kept-graph"`` when ``reuse=True``).
        psd: ``False``: the exact Hessian of a non-convex loss can be indefinite.
        memo: an empty dict at construction, for callers to cache what is derived from this one
            operator (e.g. a low-rank approximation shared by several solves).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> def f(p):                                    # 1/2 w^T Q w: Hessian Q
        ...     return 0.5 * p["w"] @ Q @ p["w"]
        >>> H = ib.HessianOperator(f, {"w": torch.zeros(2, dtype=torch.float64)})
        >>> H({"w": torch.tensor([1.0, 0.0], dtype=torch.float64)})["w"].tolist()
        [2.0, 0.5]
        >>> H.batched({"w": torch.eye(2, dtype=torch.float64)})["w"].tolist()   # k = 2 tangents
        [[2.0, 0.5], [0.5, 1.0]]
    """

    psd = False

    def __init__(
        self,
        fn: Callable[..., Tensor],
        params: Mapping[str, Tensor],
        *args: Any,
        mode: HVPMode = "auto",
        reuse: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        super().__init__(params)
        self._fn = _scalar_fn(fn)
        self._args = args
        if reuse:
            self.mode = "kept-graph"
            self._graph = _FirstOrderGraph(self._fn, self.params, args)
            self.loss = self._graph.loss
        else:
            self.mode = mode
            self._pin = RNGPin(self.params.values())

    def _product(self, tangent: Params, k: int | None = None) -> Params:
        if self.mode == "kept-graph":
            return self._graph.product(tangent, retain_graph=True, k=k)
        product, used = _evaluate(self._fn, self.params, tangent, self._args, self.mode, k,
                                  pin=self._pin)
        if used == "reverse-over-reverse":
            self.mode = used
        return product

    def _warning_key(self) -> tuple[int, str]:
        return _warning_key(self._fn)

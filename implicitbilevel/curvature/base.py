"""Machinery shared by the curvature operators: batched tangents, RNG pinning, the loop fallback.

A *batched* tangent dict carries ``k`` tangents stacked along a new leading dimension: its entry
``name`` has shape ``(k, *params[name].shape)``. The operators answer it with the ``k`` products
stacked the same way, ``out[name][i] = (A t_i)[name]``, in one vectorised pass when every operation
has a batching rule and with ``k`` single products otherwise.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import Params

_BATCHED_FALLBACK_WARNED: set[tuple[int, str]] = set()
_FORWARD_AD_HINTS = ("forward ad", "forward-mode", "forward mode", "jvp", "forward grad")


def check_scalar(loss: Any) -> None:
    """Raise unless ``loss`` is a 0-dim tensor."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"the loss must return a scalar tensor, got {shape}; reduce it (e.g. .mean()) first"
        )


def check_tangent(params: Mapping[str, Tensor], tangent: Mapping[str, Tensor]) -> None:
    """Raise unless ``tangent`` has exactly the names and shapes of ``params``."""
    if tangent.keys() != params.keys():
        missing = sorted(set(params) - set(tangent))
        extra = sorted(set(tangent) - set(params))
        raise KeyError(
            f"tangent names differ from the parameters: missing {missing}, extra {extra}"
        )
    for name, p in params.items():
        if tangent[name].shape != p.shape:
            raise ValueError(
                f"tangent {name!r} has shape {tuple(tangent[name].shape)}, "
                f"the parameter has {tuple(p.shape)}"
            )


def lacks_forward_ad(err: BaseException) -> bool:
    """Whether ``err`` says that an operation has no forward-mode AD rule."""
    message = str(err).lower()
    return isinstance(err, (RuntimeError, NotImplementedError)) and any(
        hint in message for hint in _FORWARD_AD_HINTS
    )


def warn_mode_fallback(
    warned: set[tuple[int, str]], key: tuple[int, str], what: str, err: BaseException
) -> None:
    """Warn once per ``key`` that ``auto`` fell back from forward mode to reverse mode."""
    if key not in warned:
        warned.add(key)
        warnings.warn(
            f"forward-over-reverse {what} failed for {key[1]} ({err}); falling back "
            "to reverse-over-reverse for this loss",
            RuntimeWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def quiet_forward_ad() -> Iterator[None]:
    """Silence the torch-internal deprecation warning of the first forward-mode call."""
    with warnings.catch_warnings():
        # torch's first forward-mode call imports JIT-scripted decompositions, which warns about
        # the deprecation of torch.jit.script; it is torch-internal and says nothing to the user.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


def check_batched_tangents(params: Mapping[str, Tensor], tangents: Mapping[str, Tensor]) -> int:
    """Validate ``tangents`` against ``params`` and return the number ``k`` of stacked tangents."""
    if tangents.keys() != params.keys():
        missing = sorted(set(params) - set(tangents))
        extra = sorted(set(tangents) - set(params))
        raise KeyError(
            f"batched tangent names differ from the parameters: missing {missing}, extra {extra}"
        )
    sizes: dict[str, int] = {}
    for name, p in params.items():
        t = tangents[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"batched tangent {name!r} is a {type(t).__name__}, not a Tensor")
        if t.ndim != p.ndim + 1 or t.shape[1:] != p.shape:
            raise ValueError(
                f"batched tangent {name!r} has shape {tuple(t.shape)}; it must be "
                f"(k, *{tuple(p.shape)}): stack the k tangents along a new leading dimension "
                "(torch.stack), or call the operator itself for a single tangent"
            )
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"batched tangents disagree on the leading dimension k: {sizes}; every name must "
            "carry the same number of stacked tangents"
        )
    return next(iter(sizes.values()), 0)


def unstack(tangents: Mapping[str, Tensor], i: int) -> Params:
    """The ``i``-th tangent of a batched tangent dict (views, no copies)."""
    return {n: t[i] for n, t in tangents.items()}


def empty_batch(params: Mapping[str, Tensor]) -> Params:
    """The answer to ``k = 0`` stacked tangents: zero-length stacks shaped like ``params``."""
    return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}


def zeros_batch(k: int, like: Tensor) -> Tensor:
    """``k`` stacked zero products for a parameter the operator does not couple to anything."""
    return like.new_zeros((k, *like.shape))


def zero_product(like: Tensor, k: int | None) -> Tensor:
    """A zero product shaped like ``like`` (``k`` stacked ones when ``k`` is not ``None``)."""
    return torch.zeros_like(like) if k is None else zeros_batch(k, like)


class CurvatureOperator(abc.ABC):
    """What every curvature operator shares: the point, the product count, the memo, and the
    single and batched calls around one ``_product(tangent, k)`` (``k=None``: one tangent).

    Attributes:
        names: the parameter names, in order.
        params: the point, ``{name: Tensor}`` detached (do not modify it in place).
        loss: the loss at the point (kept-graph mode only; ``None`` otherwise).
        calls: number of products evaluated so far (a batched call of ``k`` tangents counts ``k``).
        memo: an empty dict at construction, for callers to cache what is derived from this one
            operator (e.g. a low-rank approximation shared by several solves).

    The operator is bound to its point. At construction it records the version counters
    (``Tensor._version``) of the point and a fingerprint of its values (per tensor, its sum and
    its 2-norm). Every product first checks the version counters (free): a point changed in place
    afterwards (an optimiser step on the lower variables) raises a ``RuntimeError`` instead of
    answering with the curvature of a point that no longer exists (a kept graph need not save the
    tensors autograd would check). :meth:`check_point` with ``at=`` also compares the fingerprint
    of the values, which catches what version counters miss: a change made through ``.data``, or
    a call with another dict of values than the one the operator was built at.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ Q @ p["w"],
        ...                        {"w": torch.zeros(2, dtype=torch.float64)})
        >>> isinstance(H, ib.CurvatureOperator), H.names
        (True, ['w'])
        >>> _ = H({"w": torch.ones(2, dtype=torch.float64)})
        >>> _ = H.batched({"w": torch.eye(2, dtype=torch.float64)})     # k = 2 products in one call
        >>> H.calls                                       # products: 1 + 2
        3
    """

    psd: bool = False

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params.keys())
        self.calls = 0
        self.loss: Tensor | None = None
        self.memo: dict[Any, Any] = {}
        self.params = {n: p.detach() for n, p in params.items()}
        self._versions = _versions(self.params.values())
        self._fingerprint = fingerprint(self.params.values())

    def check_point(self, at: Mapping[str, Tensor] | None = None) -> None:
        """Raise ``RuntimeError`` if a tensor of the point was changed in place since
        construction; with ``at`` (values by name, e.g. the lower variables an upper step is
        taken at), also if the point's values or those of ``at`` differ from the values the
        operator was built at (one reduction over the point and one host synchronisation)."""
        now = _versions(self.params.values())
        if now != self._versions:
            changed = [n for n, a, b in zip(self.names, self._versions, now) if a != b]
            self._refuse(f"was modified in place after it was built (parameters {changed[:5]})")
        if at is None:
            return
        missing = [n for n in self.names if n not in at]
        if missing:
            self._refuse(f"is not the point asked for: {missing[:5]} are not given")
        for what, values in (("was modified after it was built (e.g. through .data)",
                              self.params.values()),
                             ("differs from the values given", (at[n] for n in self.names))):
            differ = ~(fingerprint(values) == self._fingerprint).all(dim=1)
            if bool(differ.any()):
                names = [self.names[i] for i in differ.nonzero().flatten().tolist()]
                self._refuse(f"{what} (parameters {names[:5]})")

    def _refuse(self, why: str) -> None:
        raise RuntimeError(
            f"the point of this curvature operator {why}; its products would not be those of the "
            "point asked for. Build a new one at the new point (BilevelProblem.lower_hessian(...))"
        )

    @abc.abstractmethod
    def _product(self, tangent: Params, k: int | None = None) -> Params:
        """The product with one tangent (``k=None``) or ``k`` stacked tangents."""

    @abc.abstractmethod
    def _warning_key(self) -> tuple[int, str]:
        """The function a fallback warning is about (warned once per function)."""

    def __call__(self, tangent: Mapping[str, Tensor]) -> Params:
        """Return the product with ``tangent`` as a dict with the operator's parameter names."""
        check_tangent(self.params, tangent)
        self.check_point()
        self.calls += 1
        return self._product(dict(tangent))

    def batched(self, tangents: Mapping[str, Tensor]) -> Params:
        """Return the ``k`` products stacked: ``out[name][i]`` is the product with ``t_i``.

        Args:
            tangents: every entry of shape ``(k, *params[name].shape)``, the same ``k`` for all.

        Equal to ``k`` calls of the operator (and counted as ``k`` in :attr:`calls`): backward
        passes run with ``is_grads_batched=True``, forward-mode passes under ``torch.func.vmap``.
        When the vectorised pass raises (an operation without a batching rule) the products are
        computed one at a time, with a one-time ``RuntimeWarning`` that names the reason.
        """
        k = check_batched_tangents(self.params, tangents)
        self.check_point()
        if k == 0:
            return empty_batch(self.params)
        tangents = dict(tangents)
        try:
            product = self._product(tangents, k)
        except (RuntimeError, NotImplementedError) as err:
            product = loop_products(self._product, tangents, k, self._warning_key(), err)
        self.calls += k
        return product


def fingerprint(tensors: Iterable[Tensor]) -> Tensor:
    """Per tensor its sum and its 2-norm, shape ``(n, 2)`` in float64: a cheap summary of the
    values that two equal points share exactly and a changed point almost surely does not."""
    ts = [t.detach() for t in tensors]
    if not ts:
        return torch.zeros(0, 2, dtype=torch.float64)
    norms = torch._foreach_norm(ts, 2)
    parts = [torch.stack([t.sum().to(torch.float64), n.to(torch.float64)])
             for t, n in zip(ts, norms)]
    if len({part.device for part in parts}) > 1:  # a point spread over devices
        parts = [part.cpu() for part in parts]
    return torch.stack(parts).cpu()


def _versions(tensors: Iterable[Tensor]) -> tuple[int, ...] | None:
    """The version counters of ``tensors`` (``None`` for inference tensors, which have none)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


def loop_products(
    single: Callable[[Params], Params],
    tangents: Mapping[str, Tensor],
    k: int,
    key: tuple[int, str],
    err: BaseException,
) -> Params:
    """The ``k`` products one at a time, after the vectorised pass raised ``err``.

    Warns once per ``key`` (the function's identity and name), and only when the single products
    succeed: if they fail too, their error is the one that describes the problem.
    """
    singles = [single(unstack(tangents, i)) for i in range(k)]
    out = {n: torch.stack([s[n] for s in singles]) for n in tangents}
    if key not in _BATCHED_FALLBACK_WARNED:
        _BATCHED_FALLBACK_WARNED.add(key)
        warnings.warn(
            f"the vectorised batched product failed for {key[1]} ({type(err).__name__}: {err}); "
            "computing the products one at a time for this function instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return out


class RNGPin:
    """The random-number state at construction, restored around every evaluation.

    Entering ``pin()`` sets the CPU (and, for CUDA tensors, the device) generators to the captured
    state and restores the caller's state on exit, so every evaluation draws the same dropout masks
    and the global random stream does not move.
    """

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.devices = sorted({0 if t.device.index is None else t.device.index
                               for t in tensors if t.device.type == "cuda"})
        self._cpu = torch.random.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.random.set_rng_state(self._cpu)
            for device, state in zip(self.devices, self._cuda):
                torch.cuda.set_rng_state(state, device)
            yield

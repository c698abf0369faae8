"""Batch normalisation with statistics over all data-parallel ranks, twice differentiable.

In data-parallel training a plain BatchNorm normalises each rank's shard with that shard's
statistics, so the loss of B samples on each of W ranks is not the loss of the WB batch.
Synchronised batch normalisation computes the mean and variance of channel ``c`` over the whole
global batch,

.. math::

    \\mu_c = \\frac{1}{n} \\sum_{r} \\sum_{i \\in r} x_{ic}, \\qquad
    \\sigma^2_c = \\frac{1}{n} \\sum_{r} \\sum_{i \\in r} (x_{ic} - \\mu_c)^2,

so that the W-rank loss, its gradients and its Hessian-vector products (averaged across ranks by
:class:`~implicitbilevel.distributed.AllReduceMean`) are those of the single-process WB batch.

``torch.nn.SyncBatchNorm`` does not fit bilevel training: it runs on GPUs only, and its backward
pass combines the ranks with fused kernels and an in-place all-reduce that autograd does not
record, so a Hessian-vector product taken through it by double backward would lose the cross-rank
terms. :class:`SyncBatchNorm` is written with differentiable operations around one all-reduce per
call, whose backward is again an all-reduce, so gradients, double backward (the kept-graph HVPs)
and forward-mode products all see the global batch. It works on every backend (gloo on CPU, NCCL
on GPU).

Each rank contributes, per channel, its count ``n_r``, ``n_r m_r`` and ``n_r m_r²`` (``m_r`` its
local mean) and its centred sum of squares ``M2_r = n_r v_r`` (``v_r`` its local variance, both
from one ``torch.var_mean`` pass); one summed all-reduce then gives

.. math::

    \\mu = \\frac{\\sum_r n_r m_r}{n}, \\qquad
    n \\sigma^2 = \\sum_r M2_r + \\sum_r n_r m_r^2 - n \\mu^2,

which cancels only the between-rank spread of the means, not the raw second moment.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """``y_r = Σ_s x_s`` on every rank ``r``; the adjoint is the same sum of the cotangents."""

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Through .apply, so that a second backward (an HVP) all-reduces again.
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(tangent, ctx.group)


def _all_reduce_sum(x: Tensor, group: Any) -> Tensor:
    return _AllReduceSum.apply(x, group)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (see the module docstring).

    A drop-in for ``nn.BatchNorm1d/2d/3d`` on inputs ``(N, C, ...)``. Outside a multi-rank process
    group, or in eval mode, it is exactly a plain BatchNorm. Running statistics are updated with the
    global mean and unbiased global variance, so they stay identical on every rank. Inputs in a
    16-bit float type (bf16 autocast) are normalised in float32 and returned in their own type.

    Args:
        num_features: the number of channels ``C``.
        eps, momentum, affine, track_running_stats: as for ``nn.BatchNorm2d``.
        process_group: the ranks to synchronise over (default: the world).

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel.sync_batchnorm import SyncBatchNorm
        >>> from implicitbilevel.parallel.sync_batchnorm import convert_sync_batchnorm
        >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
        >>> sync = SyncBatchNorm(3, dtype=torch.float64)
        >>> plain = torch.nn.BatchNorm2d(3, dtype=torch.float64)
        >>> torch.allclose(sync(x), plain(x))              # one process: a plain BatchNorm
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(input.shape)}")
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension 1, got {input.size(1)}"
            )

    def _synchronised(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the statistics of the global batch (train mode)."""
        self._check_input_dim(input)
        if not self._synchronised():
            return super().forward(input)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = x.numel() // x.size(1)
        if n_local == 0:
            raise ValueError("SyncBatchNorm received an empty batch on this rank")
        local_var, local_mean = torch.var_mean(x, dims, correction=0)
        count = x.new_full((1,), float(n_local))
        summed = _all_reduce_sum(
            torch.cat([n_local * local_mean, n_local * local_var,
                       n_local * local_mean.square(), count]),
            self.process_group,
        )
        c = x.size(1)
        n = summed[-1].detach()
        mean = summed[:c] / n
        var = ((summed[c:2 * c] + summed[2 * c:3 * c]) / n - mean.square()).clamp_min(0)
        # One pass over x: out = x·scale + shift, with the affine terms folded per channel.
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
            shift = self.bias - mean * scale
        else:
            shift = -mean * scale
        out = torch.addcmul(shift.view(shape), x, scale.view(shape))
        self._update_running_stats(mean, var, n)
        return out.to(input.dtype)

    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        # Inside this library's HVPs the statistics are throwaway copies and the counter is None.
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:
            tracked = self.num_batches_tracked
            factor = 1.0 / float(tracked) if tracked is not None else 0.0
        else:
            factor = self.momentum
        unbiased = var.detach() * (n / (n - 1.0).clamp_min(1.0))
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a :class:`SyncBatchNorm` (in place).

    The new layers take over the old layers' parameter objects (an optimiser built before the
    conversion keeps working), running statistics, counter and train/eval mode. ``torch``'s own
    ``nn.SyncBatchNorm`` layers are converted too. Returns ``module`` itself, or the new layer when
    ``module`` is a BatchNorm.

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel.sync_batchnorm import SyncBatchNorm
        >>> from implicitbilevel.parallel.sync_batchnorm import convert_sync_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        >>> weight = net[1].weight
        >>> net = convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, net[1].weight is weight  # the same parameter objects
        ('SyncBatchNorm', True)
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNorm
    ):
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            sync.weight = module.weight
            sync.bias = module.bias
        if module.track_running_stats:
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module

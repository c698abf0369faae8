"""Augmentations of thesis Sec. 6.1.1, per image (``torchvision.transforms.v2``) and per batch.

Pretext views (both inputs unless stated):

1. random crop of area 0.5-1 (``crop="thesis"``), resized to ``size``; ``crop="reference"`` is
   the public BiSSL code's variant: area (0.08, 1) with aspect-ratio bounds (0.5, 2);
2. horizontal flip, p = 0.5;
3. colour jitter brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, p = 0.8;
4. grayscale, p = 0.2;
5. Gaussian blur, kernel 23 (at 96 px), p = 1.0 for the first view and 0.1 for the second;
6. solarisation, p = 0.0 for the first view and 0.2 for the second;
7. normalisation with the ImageNet mean and standard deviation.

:func:`simclr_views` builds this with ``transforms.v2`` for datasets of PIL images.
:class:`BatchAugment` applies the same distribution to a whole ``(B, 3, H, W)`` batch of tensors
in a few vectorised ops, with independent random parameters per image; the embedded dataset uses it
because per-image transforms cost more than the model on 16-px images. Its only departures: the
colour-jitter order is fixed (brightness, contrast, saturation, hue) and hue is shifted by a
rotation in YIQ space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchAugment",
    "TwoViews",
    "downstream_eval_transform",
    "downstream_train_transform",
    "simclr_views",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.224)  # as printed in the thesis (Sec. 6.1.1, item 7)


def _crop(size: int, crop: str, scale_min: float) -> v2.Transform:
    if crop == "thesis":
        return v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True)
    if crop == "reference":
        return v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(0.5, 2.0), antialias=True)
    raise ValueError(f"crop must be 'thesis' or 'reference', got {crop!r}")


def _view(
    size: int,
    blur_p: float,
    solarize_p: float,
    *,
    crop: str,
    scale_min: float,
    blur_kernel: int,
    blur_sigma: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            _crop(size, crop, scale_min),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=blur_sigma)], p=blur_p),
            v2.RandomSolarize(0.5, p=solarize_p),
            v2.Normalize(mean, std),
        ]
    )


class TwoViews:
    """Apply two transforms to one image: ``img -> (t1(img), t2(img))``."""

    def __init__(self, first: Callable[[Any], Tensor], second: Callable[[Any], Tensor]) -> None:
        self.first, self.second = first, second

    def __call__(self, img: Any) -> tuple[Tensor, Tensor]:
        """The two views."""
        return self.first(img), self.second(img)


def simclr_views(
    size: int = 96,
    *,
    crop: str = "thesis",
    scale_min: float = 0.5,
    blur_kernel: int = 23,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TwoViews:
    """The asymmetric SimCLR/BYOL view pair of Sec. 6.1.1 for PIL images or tensors (blur sigma
    drawn uniformly from ``blur_sigma``)."""
    kw = dict(crop=crop, scale_min=scale_min, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
              mean=mean, std=std)
    return TwoViews(_view(size, 1.0, 0.0, **kw), _view(size, 0.1, 0.2, **kw))


def downstream_train_transform(
    size: int = 96,
    scale_min: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Downstream training: random crop (area ``scale_min``-1) to ``size``, flip, normalise."""
    return _normalised([v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
                        v2.RandomHorizontalFlip(0.5)], mean, std)


def downstream_eval_transform(
    size: int = 96,
    resize: int = 109,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Downstream evaluation: resize the short side to ``resize``, centre-crop ``size``."""
    return _normalised([v2.Resize(resize, antialias=True), v2.CenterCrop(size)], mean, std)


def _normalised(steps: list[Any], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """``steps`` on a float image in [0, 1], then normalised."""
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *steps, v2.Normalize(mean, std)]
    )


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class BatchAugment:
    """Batched version of one pretext view (or, with ``jitter_p = gray_p = blur_p =
    solarize_p = 0``, the downstream training transform) for float images in ``[0, 1]``.

    Every image draws its own crop, flip, jitter factors, blur sigma and coin flips.
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_kernel: int = 3,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {blur_kernel}")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.flip_p, self.jitter, self.jitter_p, self.gray_p = flip_p, jitter, jitter_p, gray_p
        self.blur_p, self.blur_kernel, self.blur_sigma = blur_p, blur_kernel, blur_sigma
        self.solarize_p = solarize_p
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @staticmethod
    def _u(n: int, lo: float, hi: float, g: torch.Generator | None, dev: torch.device) -> Tensor:
        return torch.rand(n, generator=g).to(dev) * (hi - lo) + lo

    def _coin(self, n: int, p: float, g: torch.Generator | None, dev: torch.device) -> Tensor:
        return (torch.rand(n, generator=g) < p).to(dev).view(n, 1, 1, 1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` of shape ``(B, 3, H, W)`` in ``[0, 1]``; returns normalised
        ``(B, 3, size, size)``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(x.shape)}")
        b, dev, g = x.shape[0], x.device, generator
        x = self._crop_flip(x, g)
        if self.jitter_p > 0:
            x = torch.where(self._coin(b, self.jitter_p, g, dev), self._color(x, g), x)
        if self.gray_p > 0:
            x = torch.where(self._coin(b, self.gray_p, g, dev), _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            x = torch.where(self._coin(b, self.blur_p, g, dev), self._blur(x, g), x)
        if self.solarize_p > 0:
            solarized = torch.where(x >= 0.5, 1.0 - x, x)
            x = torch.where(self._coin(b, self.solarize_p, g, dev), solarized, x)
        return (x - self.mean.to(dev)) / self.std.to(dev)

    def _crop_flip(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        b, dev = x.shape[0], x.device
        area = self._u(b, *self.scale, g, dev)
        log_r = self._u(b, math.log(self.ratio[0]), math.log(self.ratio[1]), g, dev)
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        cx = (self._u(b, -1.0, 1.0, g, dev)) * (1 - w)
        cy = (self._u(b, -1.0, 1.0, g, dev)) * (1 - h)
        flip = torch.where(self._coin(b, self.flip_p, g, dev).view(b), -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        b, dev = x.shape[0], x.device
        br, co, sa, hu = self.jitter
        x = (x * self._u(b, 1 - br, 1 + br, g, dev).view(b, 1, 1, 1)).clamp(0, 1)
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * self._u(b, 1 - co, 1 + co, g, dev).view(b, 1, 1, 1) + m).clamp(0, 1)
        gray = _gray(x)
        x = ((x - gray) * self._u(b, 1 - sa, 1 + sa, g, dev).view(b, 1, 1, 1) + gray).clamp(0, 1)
        angle = self._u(b, -hu, hu, g, dev) * 2 * math.pi
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev
        )
        yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
        c, s = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)

    def _blur(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        b, c, hgt, wid = x.shape
        k = self.blur_kernel
        sigma = self._u(b, *self.blur_sigma, g, x.device).view(b, 1)
        offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        flat = x.reshape(1, b * c, hgt, wid)
        pad = k // 2
        flat = F.conv2d(
            F.pad(flat, (pad, pad, 0, 0), mode="replicate"), kernel.view(-1, 1, 1, k), groups=b * c
        )
        flat = F.conv2d(
            F.pad(flat, (0, 0, pad, pad), mode="replicate"), kernel.view(-1, 1, k, 1), groups=b * c
        )
        return flat.view(b, c, hgt, wid)


def pretext_batch_views(
    size: int,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    blur_kernel: int = 3,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[BatchAugment, BatchAugment]:
    """The two asymmetric batched pretext views (blur 1.0/0.1, solarise 0.0/0.2)."""
    kw = dict(scale=scale, blur_kernel=blur_kernel, blur_sigma=blur_sigma, mean=mean, std=std)
    return (
        BatchAugment(size, blur_p=1.0, solarize_p=0.0, **kw),
        BatchAugment(size, blur_p=0.1, solarize_p=0.2, **kw),
    )


__all__ += ["pretext_batch_views"]

"""DataLoaders for every stage, for the embedded digits and for the real datasets alike.

Pretext loaders yield ``(view1, view2)``; downstream loaders yield ``(images, targets)``, with
targets class indices or multi-hot vectors (VOC07).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from recipes.common import loader_kwargs, shard_loader

from .augment import (
    BatchAugment,
    downstream_eval_transform,
    downstream_train_transform,
    pretext_batch_views,
    simclr_views,
)
from .config import DataConfig
from .data import (
    MappedLoader,
    _First,
    check_split_sizes,
    digits_splits,
    downstream_datasets,
    pretext_dataset,
)

__all__ = ["Loaders", "build_loaders"]


@dataclass
class Loaders:
    """Loader factories for one run (the data is built once, loaders per seed/batch size)."""

    cfg: DataConfig
    device: torch.device
    pretext_set: Dataset
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    num_classes: int
    multilabel: bool
    embedded: bool

    def _kw(self) -> dict[str, Any]:
        return loader_kwargs(self.device, 0 if self.embedded else self.cfg.workers)

    def _shuffled(
        self, ds: Dataset, batch_size: int, seed: int, drop_last: bool,
        shard: tuple[int, int] | None,
    ) -> DataLoader:
        # Shuffles draw from torch's global generator (seeded by each stage and trial), so the
        # BiSSL trainer's checkpoint restores the exact data order on resume; with ``shard`` a
        # DistributedSampler seeded with ``seed`` shuffles.
        return shard_loader(ds, batch_size, shuffle=True, seed=seed, shard=shard,
                            drop_last=drop_last, **self._kw())

    def pretext(
        self, batch_size: int, seed: int, shard: tuple[int, int] | None = None
    ) -> Iterable:
        """Shuffled pretext pairs, incomplete last batch dropped (NT-Xent wants full batches).

        ``shard=(rank, world)`` gives this rank's part of every pass (``batch_size`` per rank).
        """
        if len(self.pretext_set) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"pretext batch size {batch_size} exceeds the {len(self.pretext_set)} pretext "  # type: ignore[arg-type]
                "images; lower the batch size"
            )
        loader = self._shuffled(self.pretext_set, batch_size, seed, True, shard)
        if not self.embedded:
            return loader
        size, c = self.cfg.image_size, self.cfg
        first, second = pretext_batch_views(
            size,
            scale=(c.crop_scale_min, 1.0),
            blur_kernel=c.blur_kernel,
            blur_sigma=(c.blur_sigma[0], c.blur_sigma[1]),
            mean=c.mean,
            std=c.std,
        )
        return MappedLoader(loader, lambda b: (first(b[0]), second(b[0])))

    def train(self, batch_size: int, seed: int, shard: tuple[int, int] | None = None) -> Iterable:
        """Shuffled, augmented downstream training batches (``shard`` as for :meth:`pretext`)."""
        loader = self._shuffled(self.train_set, batch_size, seed, False, shard)
        if not self.embedded:
            return loader
        c = self.cfg
        aug = BatchAugment(
            c.image_size,
            scale=(c.crop_scale_min, 1.0),
            jitter_p=0.0,
            gray_p=0.0,
            mean=c.mean,
            std=c.std,
        )
        return MappedLoader(loader, lambda b: (aug(b[0]), b[1]))

    def _eval(self, ds: Dataset, batch_size: int) -> Iterable:
        loader = DataLoader(ds, batch_size, shuffle=False, **self._kw())
        if not self.embedded:
            return loader
        mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std).view(1, 3, 1, 1)
        return MappedLoader(loader, lambda b: ((b[0] - mean) / std, b[1]))

    def val(self, batch_size: int) -> Iterable:
        """Validation batches (evaluation transform)."""
        return self._eval(self.val_set, batch_size)

    def test(self, batch_size: int) -> Iterable:
        """Test batches (evaluation transform)."""
        return self._eval(self.test_set, batch_size)

    def monitor_views(self, batch_size: int) -> Iterable:
        """Unlabelled ``(view1, view2)`` batches of the validation images for the transfer
        monitor: the pretext views (crop, flip, blur, solarise) of each image, applied to the
        images alone (the labels are dropped before loading, never read)."""
        c = self.cfg
        first, second = pretext_batch_views(
            c.image_size, scale=(c.crop_scale_min, 1.0), blur_kernel=c.blur_kernel,
            blur_sigma=(c.blur_sigma[0], c.blur_sigma[1]), mean=c.mean, std=c.std,
        )
        mean = torch.tensor(c.mean).view(1, 3, 1, 1)
        std = torch.tensor(c.std).view(1, 3, 1, 1)
        # real datasets arrive normalised by the evaluation transform: back to [0, 1] first
        raw = (lambda b: b) if self.embedded else (lambda b: (b * std + mean).clamp(0, 1))
        loader = DataLoader(_First(self.val_set), batch_size, shuffle=False, **self._kw())
        return MappedLoader(loader, lambda b: (first(raw(b)), second(raw(b))))


def build_loaders(cfg: DataConfig, device: torch.device) -> Loaders:
    """Open the configured datasets (raising ``DatasetNotFoundError`` early when one is
    missing, ``ValueError`` when a downstream split holds no image) and return the loader
    factories."""
    if cfg.pretext == "digits":
        s = digits_splits(cfg.image_size, cfg.digits_pretext, cfg.digits_train, cfg.digits_val)
        return Loaders(cfg, device, s["pretext"], s["train"], s["val"], s["test"], 10, False, True)
    views = simclr_views(
        cfg.image_size,
        crop=cfg.crop,
        scale_min=cfg.crop_scale_min,
        blur_kernel=cfg.blur_kernel,
        blur_sigma=(cfg.blur_sigma[0], cfg.blur_sigma[1]),
        mean=cfg.mean,
        std=cfg.std,
    )
    pre = pretext_dataset(cfg.pretext, cfg.pretext_root, views, verify=cfg.verify_images,
                          workers=cfg.workers)
    down = downstream_datasets(
        cfg.downstream,
        cfg.downstream_root,
        downstream_train_transform(cfg.image_size, cfg.crop_scale_min, cfg.mean, cfg.std),
        downstream_eval_transform(cfg.image_size, cfg.test_resize, cfg.mean, cfg.std),
        verify=cfg.verify_images,
        workers=cfg.workers,
    )
    check_split_sizes(down, cfg.downstream, cfg.downstream_root)
    return Loaders(
        cfg, device, pre, down.train, down.val, down.test, down.num_classes, down.multilabel, False
    )

"""Verify the images of a dataset before training (``data.verify_images``).

A file that is empty or cannot be decoded otherwise fails in the middle of an epoch, hours into a
run. With ``data.verify_images=fail`` every image is opened and decoded up front and the first bad
one stops the run, named; with ``skip`` the bad ones are left out (the dataset becomes a
``Subset`` of the good indices) and their number is reported; ``none`` (default) checks nothing.
Decoding runs in ``data.workers`` threads (the decoders release the GIL); results are cached by
path, so a dataset opened twice (train and evaluation transforms) is decoded once.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, Subset

__all__ = ["VERIFY_MODES", "image_files", "verify_images"]

VERIFY_MODES = ("none", "skip", "fail")


def image_files(ds: Dataset) -> list[str] | None:
    """The image file of every index of a torchvision dataset, or ``None`` when it holds no files
    (STL10's binary arrays, tensors). A ``Subset`` (the 80/20 train/val split) maps its indices."""
    if isinstance(ds, Subset):
        inner = image_files(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    if hasattr(ds, "samples"):  # ImageFolder / DatasetFolder
        return [str(path) for path, _ in ds.samples]
    for attr in ("_image_files", "images"):  # DTD, Flowers102, OxfordIIITPet; VOCDetection
        files = getattr(ds, attr, None)
        if isinstance(files, list):
            return [str(f) for f in files]
    return None


def _problem(path: str) -> str | None:
    """Why ``path`` is not a usable image (``None`` if it is)."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                return f"{image.width}x{image.height} pixels"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_images(ds: Dataset, mode: str, what: str, *, workers: int = 0,
                  cache: dict[str, str | None] | None = None) -> Dataset:
    """``ds`` with its images verified as ``mode`` says (see the module docstring).

    Args:
        ds: a torchvision dataset; one without image files is returned as it is.
        mode: ``"none"``, ``"skip"`` or ``"fail"`` (``data.verify_images``).
        what: names the dataset in messages (e.g. ``"downstream train"``).
        workers: decoding threads (``0``: one).
        cache: path to problem (``None``: fine), shared between calls.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify_images: expected one of {VERIFY_MODES}, got {mode!r}")
    files = image_files(ds) if mode != "none" else None
    if not files:
        return ds
    cache = {} if cache is None else cache
    todo = [f for f in dict.fromkeys(files) if f not in cache]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        cache.update(zip(todo, pool.map(_problem, todo)))
    bad = [(i, f) for i, f in enumerate(files) if cache[f] is not None]
    if not bad:
        return ds
    first = bad[0][1]
    if mode == "fail":
        raise ValueError(
            f"{first}: not a usable image ({cache[first]}); {len(bad)} of the {len(files)} "
            f"{what} images are empty or cannot be decoded. Fix or remove them, or set "
            "data.verify_images=skip to leave them out")
    if len(bad) == len(files):
        raise ValueError(f"none of the {len(files)} {what} images can be decoded (first: "
                         f"{first}: {cache[first]})")
    warnings.warn(
        f"data.verify_images=skip: left out {len(bad)} of {len(files)} {what} images that are "
        f"empty or cannot be decoded (first: {first}: {cache[first]})", UserWarning, stacklevel=2)
    dropped = {i for i, _ in bad}
    kept = Subset(ds, [i for i in range(len(files)) if i not in dropped])
    _keep_attributes(kept, ds)
    return kept


def _keep_attributes(subset: Subset, ds: Any) -> None:
    """Carry the class list over, which the split checks read."""
    for attr in ("classes", "class_to_idx"):
        if hasattr(ds, attr):
            setattr(subset, attr, getattr(ds, attr))

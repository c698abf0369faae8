"""Datasets: the embedded digits default and loaders for the thesis's real datasets.

Embedded default (no download): scikit-learn's bundled ``load_digits`` (1,797 grayscale 8x8
images, 10 classes), upsampled bilinearly and repeated to 3 channels, split deterministically
(seed 0, independent of the run seed) into a label-free pretext pool and downstream
train/val/test sets.

Real data (``download=False``; local roots; a missing dataset raises
:class:`DatasetNotFoundError` saying where to put it and how to obtain it):

- pretext: STL10 ``unlabeled``, ImageNet (``<root>/train`` as an ImageFolder), any ImageFolder;
- downstream: VOC07 (multi-label, 11-point mAP), DTD and Flowers-102 (official train/val/test),
  Oxford-IIIT Pets (``trainval`` split 80/20 into train/val, official test), VOC07 (``trainval``
  split 80/20, official test), any ImageFolder (``<root>/{train,val,test}``; without ``val`` the
  train folder is split 80/20).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets as tvd

from .verify import verify_images

__all__ = [
    "VOC_CLASSES",
    "DatasetNotFoundError",
    "DownstreamData",
    "MappedLoader",
    "check_split_sizes",
    "digits_splits",
    "downstream_datasets",
    "pretext_dataset",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_HOW_TO_GET = {
    "stl10": (
        "<root>/stl10_binary/unlabeled_X.bin",
        "download https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and extract it in "
        "<root>, or run torchvision.datasets.STL10(<root>, split='unlabeled', download=True) "
        "where there is internet access",
    ),
    "imagenet": (
        "<root>/train/<class>/<image>.JPEG (ImageFolder layout)",
        "ImageNet-1K needs registration at https://image-net.org; extract ILSVRC2012_img_train "
        "into one folder per class",
    ),
    "imagefolder": (
        "<root>/<class>/<image> for pretext, <root>/{train,val,test}/<class>/<image> downstream",
        "any folder of images laid out as torchvision.datasets.ImageFolder expects",
    ),
    "dtd": (
        "<root>/dtd/dtd/{images,labels}",
        "run torchvision.datasets.DTD(<root>, download=True) where there is internet access, or "
        "extract https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz into "
        "<root>/dtd",
    ),
    "pets": (
        "<root>/oxford-iiit-pet/{images,annotations}",
        "run torchvision.datasets.OxfordIIITPet(<root>, download=True) where there is internet "
        "access (images.tar.gz and annotations.tar.gz from "
        "https://www.robots.ox.ac.uk/~vgg/data/pets/)",
    ),
    "flowers": (
        "<root>/flowers-102/{jpg,imagelabels.mat,setid.mat}",
        "run torchvision.datasets.Flowers102(<root>, download=True) where there is internet "
        "access (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)",
    ),
    "voc07": (
        "<root>/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}",
        "extract VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/) into <root>",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not at its configured root; the message says where and how to get it."""

    def __init__(self, name: str, root: str | Path, cause: BaseException | None = None) -> None:
        layout, how = _HOW_TO_GET[name]
        msg = (
            f"dataset {name!r} not found under root {str(root)!r}. Expected layout: "
            f"{layout.replace('<root>', str(root))}. To obtain it: "
            f"{how.replace('<root>', str(root))}."
        )
        if cause is not None:
            msg += f" (torchvision said: {cause})"
        super().__init__(msg)


def _open(name: str, root: str, build: Callable[[], Dataset]) -> Dataset:
    if not root:
        raise DatasetNotFoundError(name, "<empty: set data.*_root in the config>")
    if not Path(root).is_dir():
        raise DatasetNotFoundError(name, root)
    try:
        return build()
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetNotFoundError(name, root, err) from err


# --------------------------------------------------------------------------------------------
# embedded default


def digits_splits(
    size: int = 16, n_pretext: int = 1000, n_train: int = 250, n_val: int = 200
) -> dict[str, TensorDataset]:
    """Split scikit-learn's digits into ``pretext`` (images only), ``train``, ``val`` and
    ``test`` (the rest) TensorDatasets of float images ``(3, size, size)`` in ``[0, 1]``.

    The split uses a fixed permutation (seed 0), so it does not change with the run seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    if n_pretext + n_train + n_val >= n:
        raise ValueError(
            f"n_pretext + n_train + n_val = {n_pretext + n_train + n_val} leaves no test images "
            f"(digits has {n})"
        )
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cuts = [0, n_pretext, n_pretext + n_train, n_pretext + n_train + n_val, n]
    parts = [perm[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return {
        "pretext": TensorDataset(images[parts[0]]),
        "train": TensorDataset(images[parts[1]], labels[parts[1]]),
        "val": TensorDataset(images[parts[2]], labels[parts[2]]),
        "test": TensorDataset(images[parts[3]], labels[parts[3]]),
    }


class MappedLoader:
    """A re-iterable loader that applies ``fn`` to every batch of ``loader`` (e.g. batched
    augmentation of the embedded data)."""

    def __init__(self, loader: DataLoader, fn: Callable[[Any], Any]) -> None:
        self.loader, self.fn = loader, fn

    def __iter__(self) -> Iterator[Any]:
        """Yield ``fn(batch)`` for each batch of the wrapped loader."""
        for batch in self.loader:
            yield self.fn(batch)

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler (so a trainer can call ``set_epoch`` on it)."""
        return self.loader.sampler


# --------------------------------------------------------------------------------------------
# real datasets


class _First(Dataset):
    """Keep the first element of each item (drops labels from a pretext dataset)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.base[i][0]


def pretext_dataset(
    name: str, root: str, transform: Callable[[Any], Any], *, verify: str = "none",
    workers: int = 0,
) -> Dataset:
    """Unlabeled pretext images with ``transform`` applied (usually :func:`simclr_views`); with
    ``verify`` (``data.verify_images``) the images are checked first (:mod:`.verify`)."""
    if name == "stl10":
        ds = _open(name, root, lambda: tvd.STL10(root, split="unlabeled", transform=transform))
    elif name == "imagenet":
        train = str(Path(root) / "train")
        ds = _open(name, root, lambda: tvd.ImageFolder(train, transform=transform))
    elif name == "imagefolder":
        ds = _open(name, root, lambda: tvd.ImageFolder(root, transform=transform))
    else:
        raise ValueError(f"unknown pretext dataset {name!r}; choose stl10, imagenet, imagefolder")
    return _First(verify_images(ds, verify, "pretext", workers=workers))


def voc_multi_hot(annotation: dict[str, Any]) -> Tensor:
    """Multi-hot vector over :data:`VOC_CLASSES` of every object in a VOC annotation dict."""
    objects = annotation["annotation"].get("object", [])
    if isinstance(objects, dict):
        objects = [objects]
    target = torch.zeros(len(VOC_CLASSES))
    for obj in objects:
        target[VOC_CLASSES.index(obj["name"])] = 1.0
    return target


@dataclass
class DownstreamData:
    """Train/val/test datasets of one downstream task."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    multilabel: bool = False
    split_from: str | None = None
    """Where train and val come from when they are an 80/20 split of one set (else ``None``)."""


def check_split_sizes(data: DownstreamData, name: str, root: str) -> None:
    """``ValueError`` naming the split and the sizes of all three when one holds no image (an
    empty validation split otherwise fails evaluation mid-run, ``torch.cat`` of nothing)."""
    sizes = {split: len(getattr(data, split)) for split in ("train", "val", "test")}
    empty = [split for split, n in sizes.items() if n == 0]
    if not empty:
        return
    counts = ", ".join(f"{split} {n}" for split, n in sizes.items())
    source = f"; train and val split 80/20 from {data.split_from}" if data.split_from else ""
    raise ValueError(
        f"downstream {name} under {root!r}: the {empty[0]} split holds no image ({counts}"
        f"{source}). Every split needs at least one image: add images"
        + (" or a val/ folder" if name == "imagefolder" and data.split_from else "")
        + " (data.downstream_root)")


def _split_80_20(n: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    cut = int(round(0.8 * n))
    return sorted(perm[:cut]), sorted(perm[cut:])


def check_class_lists(classes: dict[str, list[str]], root: Path) -> None:
    """``ValueError`` unless every ImageFolder split under ``root`` has the train split's class
    list (at least two classes), naming the split and the classes that differ."""
    reference = classes["train"]
    if len(reference) < 2:
        raise ValueError(f"{root / 'train'}: found {len(reference)} class folder(s) "
                         f"{reference}; a classifier needs at least two (data.downstream_root)")
    for split, names in classes.items():
        if names != reference:
            only_here = sorted(set(names) - set(reference))
            missing = sorted(set(reference) - set(names))
            raise ValueError(
                f"{root / split}: its classes differ from {root / 'train'}'s "
                f"(only in {split}: {only_here}, missing from {split}: {missing}); every "
                "split needs the same class folders (data.downstream_root)")


def downstream_datasets(
    name: str, root: str, train_tf: Callable[[Any], Any], eval_tf: Callable[[Any], Any], *,
    verify: str = "none", workers: int = 0,
) -> DownstreamData:
    """The thesis splits of a downstream dataset (see the module docstring); with ``verify``
    (``data.verify_images``) every split's images are checked first (:mod:`.verify`)."""
    data = _downstream_datasets(name, root, train_tf, eval_tf)
    if verify == "none":
        return data
    cache: dict[str, str | None] = {}
    data.train, data.val, data.test = (
        verify_images(getattr(data, split), verify, f"downstream {split}", workers=workers,
                      cache=cache) for split in ("train", "val", "test"))
    return data


def _downstream_datasets(
    name: str, root: str, train_tf: Callable[[Any], Any], eval_tf: Callable[[Any], Any]
) -> DownstreamData:
    if name == "dtd":

        def dtd(split: str, tf: Callable) -> Dataset:
            return _open(name, root, lambda: tvd.DTD(root, split=split, partition=1, transform=tf))

        return DownstreamData(dtd("train", train_tf), dtd("val", eval_tf), dtd("test", eval_tf), 47)
    if name == "flowers":

        def flowers(split: str, tf: Callable) -> Dataset:
            return _open(name, root, lambda: tvd.Flowers102(root, split=split, transform=tf))

        return DownstreamData(
            flowers("train", train_tf), flowers("val", eval_tf), flowers("test", eval_tf), 102
        )
    if name == "pets":

        def pets(split: str, tf: Callable) -> Dataset:
            return _open(name, root, lambda: tvd.OxfordIIITPet(root, split=split, transform=tf))

        trainval_t, trainval_e = pets("trainval", train_tf), pets("trainval", eval_tf)
        tr, va = _split_80_20(len(trainval_t))
        return DownstreamData(Subset(trainval_t, tr), Subset(trainval_e, va), pets("test", eval_tf),
                              37, split_from=f"the {len(trainval_t)} trainval images")
    if name == "voc07":

        def voc(split: str, tf: Callable) -> Dataset:
            return _open(
                name,
                root,
                lambda: tvd.VOCDetection(
                    root, year="2007", image_set=split, transform=tf, target_transform=voc_multi_hot
                ),
            )

        trainval_t, trainval_e = voc("trainval", train_tf), voc("trainval", eval_tf)
        tr, va = _split_80_20(len(trainval_t))
        return DownstreamData(Subset(trainval_t, tr), Subset(trainval_e, va), voc("test", eval_tf),
                              20, True, split_from=f"the {len(trainval_t)} trainval images")
    if name == "imagefolder":
        base = Path(root)

        def folder(split: str, tf: Callable) -> tvd.ImageFolder:
            return _open(name, root, lambda: tvd.ImageFolder(str(base / split), transform=tf))

        test, split_from = folder("test", eval_tf), None
        if (base / "val").is_dir():
            train, val = folder("train", train_tf), folder("val", eval_tf)
            check_class_lists({"train": train.classes, "val": val.classes,
                               "test": test.classes}, base)
        else:
            train_t, train_e = folder("train", train_tf), folder("train", eval_tf)
            check_class_lists({"train": train_t.classes, "test": test.classes}, base)
            tr, va = _split_80_20(len(train_t))
            train, val = Subset(train_t, tr), Subset(train_e, va)
            split_from = f"the {len(train_t)} images of {base / 'train'} (no val/ folder)"
        return DownstreamData(train, val, test, len(test.classes), split_from=split_from)
    raise ValueError(
        f"unknown downstream dataset {name!r}; choose voc07, dtd, pets, flowers, imagefolder"
    )

"""Loaders on fixtures written here: an ImageFolder tree, a VOC-style multi-label set, digits."""

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.vision.augment import (
    BatchAugment,
    downstream_eval_transform,
    downstream_train_transform,
    simclr_views,
)
from recipes.vision.config import DataConfig
from recipes.vision.data import (
    VOC_CLASSES,
    DatasetNotFoundError,
    digits_splits,
    downstream_datasets,
    pretext_dataset,
)
from recipes.vision.loaders import build_loaders


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _transforms():
    return downstream_train_transform(16), downstream_eval_transform(16, 18)


def test_imagefolder_downstream_and_pretext(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", hash((split, c, i)) % 1000)
    data = downstream_datasets("imagefolder", str(tmp_path), *_transforms())
    assert data.num_classes == 2 and not data.multilabel
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)  # 80/20 of 10 train
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert data.test[0][0].shape == (3, 16, 16)
    pre = pretext_dataset("imagefolder", str(tmp_path / "train"), simclr_views(16, blur_kernel=3))
    v1, v2 = pre[0]
    assert v1.shape == v2.shape == (3, 16, 16) and not torch.equal(v1, v2)


def _voc_xml(names):
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for n in names
    )
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc07_multi_label_fixture(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    labels = {
        "000001": ["dog", "person"], "000002": ["cat"], "000003": ["car", "car", "bus"],
        "000004": ["person"], "000005": ["bird"], "000006": ["tvmonitor", "sofa"],
    }  # fmt: skip
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for i, (name, objs) in enumerate(labels.items()):
        _png(voc / "JPEGImages" / f"{name}.jpg", i)
        (voc / "Annotations" / f"{name}.xml").write_text(_voc_xml(objs))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(list(labels)[:5]) + "\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000006\n")
    data = downstream_datasets("voc07", str(tmp_path), *_transforms())
    assert data.multilabel and data.num_classes == 20
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 1)
    x, target = data.test[0]
    assert x.shape == (3, 16, 16)
    expected = torch.zeros(20)
    expected[[VOC_CLASSES.index("tvmonitor"), VOC_CLASSES.index("sofa")]] = 1
    assert torch.equal(target, expected)
    everything = [data.train[i][1] for i in range(4)] + [data.val[0][1]]
    counts = torch.stack(everything).sum(0)
    assert counts[VOC_CLASSES.index("car")] == 1 and counts[VOC_CLASSES.index("person")] == 2
    assert counts.sum() == 7


@pytest.mark.parametrize("name", ["dtd", "pets", "flowers", "voc07"])
def test_missing_dataset_says_where_and_how(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="Expected layout") as err:
        downstream_datasets(name, str(tmp_path), *_transforms())
    assert str(tmp_path) in str(err.value) and "obtain" in str(err.value)


def test_missing_pretext_root():
    with pytest.raises(DatasetNotFoundError, match="stl10_binary"):
        pretext_dataset("stl10", "/nonexistent/stl", simclr_views(16, blur_kernel=3))


def test_digits_splits_are_deterministic_and_disjoint():
    a, b = digits_splits(16, 1000, 250, 200), digits_splits(16, 1000, 250, 200)
    assert torch.equal(a["test"].tensors[0], b["test"].tensors[0])
    sizes = [len(a[k]) for k in ("pretext", "train", "val", "test")]
    assert sizes == [1000, 250, 200, 347]
    # every digits image lands in exactly one split: as many distinct images as the raw set has
    from sklearn.datasets import load_digits

    raw = {row.tobytes() for row in load_digits().data}
    split = {row.numpy().tobytes() for k in a for row in a[k].tensors[0][:, 0]}
    assert len(split) == len(raw)
    x = a["train"].tensors[0]
    assert x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1


def test_embedded_loaders_and_batch_augment():
    loaders = build_loaders(
        DataConfig(pretext="digits", downstream="digits", image_size=16, blur_kernel=3),
        torch.device("cpu"),
    )
    v1, v2 = next(iter(loaders.pretext(64, seed=0)))
    assert v1.shape == v2.shape == (64, 3, 16, 16) and not torch.equal(v1, v2)
    x, y = next(iter(loaders.train(32, seed=0)))
    assert x.shape == (32, 3, 16, 16) and y.dtype == torch.long
    # identity crop, no flip, no colour ops: BatchAugment only normalises
    plain = BatchAugment(
        8,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    img = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(plain(img), (img - 0.5) / 0.25, atol=1e-5, rtol=0)
    flip = BatchAugment(
        8,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=1.0,
        jitter_p=0.0,
        gray_p=0.0,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
    )
    torch.testing.assert_close(flip(img), img.flip(-1), atol=1e-5, rtol=0)
    gray = BatchAugment(
        8,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=1.0,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
    )(img)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])

"""A small real-photo ImageFolder, offline: 32-px patches of photographs bundled with packages.

Usage::

    pip download scikit-image --no-deps -d /tmp/wheels      # the wheel only; nothing installed
    python benchmarks/photo_folder.py --skimage-wheel /tmp/wheels/scikit_image-*.whl \\
        --out /tmp/photos

Classes are photographs: ``brick``, ``grass``, ``gravel`` (grey-scale textures), ``coffee``,
``chelsea``, ``astronaut`` (from the ``skimage/data`` folder of the scikit-image wheel, read
from the zip without installing it) and ``china``, ``flower`` (scikit-learn's
``load_sample_images``). Each patch is a random square of the photograph (side 64-160 px, so a
patch shows texture rather than one flat colour) resized to ``--size`` px. The left 70% of every
photograph gives the pretext images and the downstream ``train`` split, the right 30% the ``test``
split, so no test patch overlaps a training patch. Writes::

    <out>/pretext/<class>/*.png            # --pretext images in all
    <out>/downstream/{train,test}/<class>/*.png
    <out>/stats.json                       # per-channel mean and std of the pretext images

For the vision recipe: ``--set data.pretext=imagefolder --set data.pretext_root=<out>/pretext
--set data.downstream=imagefolder --set data.downstream_root=<out>/downstream``.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SKIMAGE_PHOTOS", "build", "main", "photographs"]

SKIMAGE_PHOTOS = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut")


def photographs(skimage_wheel: str) -> dict[str, Image.Image]:
    """The RGB photographs by class name: six from the scikit-image wheel, two from scikit-learn."""
    from sklearn.datasets import load_sample_images

    out: dict[str, Image.Image] = {}
    with zipfile.ZipFile(skimage_wheel) as wheel:
        for name in SKIMAGE_PHOTOS:
            data = wheel.read(f"skimage/data/{name}.png")
            out[name] = Image.open(io.BytesIO(data)).convert("RGB")
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        out[Path(path).stem] = Image.fromarray(image).convert("RGB")
    return out


def _patches(image: Image.Image, count: int, size: int, region: tuple[float, float],
             rng: np.random.Generator) -> list[Image.Image]:
    width, height = image.size
    left, right = int(region[0] * width), int(region[1] * width)
    patches = []
    for _ in range(count):
        side = int(rng.integers(64, min(161, right - left, height)))
        x = int(rng.integers(left, right - side + 1))
        y = int(rng.integers(0, height - side + 1))
        crop = image.crop((x, y, x + side, y + side))
        patches.append(crop.resize((size, size), Image.Resampling.BILINEAR))
    return patches


def build(skimage_wheel: str, out: str, *, pretext: int = 1000, train: int = 240,
          test: int = 160, size: int = 32, seed: int = 0) -> dict[str, list[float]]:
    """Write the folders (module docstring); returns the pretext images' channel mean and std."""
    rng = np.random.default_rng(seed)
    photos = photographs(skimage_wheel)
    root = Path(out)
    pixels = []
    for name, image in photos.items():
        parts = {("pretext",): (pretext, (0.0, 0.7)), ("downstream", "train"): (train, (0.0, 0.7)),
                 ("downstream", "test"): (test, (0.7, 1.0))}
        for where, (total, region) in parts.items():
            folder = root.joinpath(*where, name)
            folder.mkdir(parents=True, exist_ok=True)
            for i, patch in enumerate(_patches(image, total // len(photos), size, region, rng)):
                patch.save(folder / f"{i:04d}.png")
                if where == ("pretext",):
                    pixels.append(np.asarray(patch, dtype=np.float64) / 255.0)
    stack = np.stack(pixels)
    stats = {"mean": [round(float(m), 3) for m in stack.mean(axis=(0, 1, 2))],
             "std": [round(float(s), 3) for s in stack.std(axis=(0, 1, 2))],
             "classes": sorted(photos)}
    (root / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    """Command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skimage-wheel", required=True, help="a scikit-image wheel (pip download)")
    p.add_argument("--out", required=True)
    p.add_argument("--pretext", type=int, default=1000)
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--test", type=int, default=160)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stats = build(a.skimage_wheel, a.out, pretext=a.pretext, train=a.train, test=a.test,
                  size=a.size, seed=a.seed)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()

"""The vision recipe's configuration (dataclasses; YAML files in ``recipes/configs``).

Defaults are the thesis's default setup (Sec. 6.1: ResNet-50, ImageNet); the YAML files
override what differs. Every field is validated on load (:func:`recipes.common.load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.common import field
from recipes.common import settings as common
from recipes.common.settings import StudyConfig, SweepConfig

__all__ = [
    "BiSSLStageConfig",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PretextConfig",
    "StudyConfig",
    "SweepConfig",
    "VisionConfig",
    "WarmupConfig",
]

PRETEXT = ("digits", "stl10", "imagenet", "imagefolder")
DOWNSTREAM = ("digits", "voc07", "dtd", "pets", "flowers", "imagefolder")


@dataclass
class DataConfig:
    """Datasets, image sizes and augmentation choices (Sec. 6.1.1)."""

    pretext: str = field("imagenet", choices=PRETEXT)
    pretext_root: str = ""
    downstream: str = field("pets", choices=DOWNSTREAM)
    downstream_root: str = ""
    image_size: int = field(96, ge=8)
    test_resize: int = field(109, ge=8)
    crop: str = field("thesis", choices=("thesis", "reference"))
    crop_scale_min: float = field(0.5, gt=0.0, le=1.0)
    blur_kernel: int = field(23, ge=1)
    blur_sigma: list[float] = field([0.1, 2.0], gt=0.0)
    mean: list[float] = field([0.485, 0.456, 0.406])
    std: list[float] = field([0.229, 0.224, 0.224], gt=0.0)
    workers: int = field(8, ge=0)
    verify_images: str = field(
        "none", choices=("none", "skip", "fail"),
        doc="decode every image up front: stop at the first bad one (fail) or leave the bad "
            "ones out and count them (skip)")
    digits_pretext: int = field(1000, ge=2)
    digits_train: int = field(250, ge=1)
    digits_val: int = field(200, ge=1)


@dataclass
class ModelConfig:
    """Backbone and SimCLR projector."""

    backbone: str = field("resnet50", choices=("small-resnet", "resnet18", "resnet50"))
    width: int = field(16, ge=1, doc="base width of small-resnet")
    small_stem: bool = False
    proj_dim: int = field(256, ge=1)


@dataclass
class PretextConfig:
    """SimCLR pretraining with LARS (Sec. 6.1.2)."""

    epochs: int = field(500, ge=0)
    baseline_extra_epochs: int = field(
        0, ge=0, doc="Only-FT starts after this many more epochs (Sec. 6.1.4: 100)"
    )
    batch_size: int = field(1024, ge=2)
    lr: float = field(4.8, gt=0.0)
    warmup_epochs: int = field(10, ge=0)
    weight_decay: float = field(1e-6, ge=0.0)
    momentum: float = field(0.9, ge=0.0, lt=1.0)
    trust_coefficient: float = field(0.001, gt=0.0)
    temperature: float = field(0.5, gt=0.0)


@dataclass
class FinetuneConfig(common.FinetuneConfig):
    """Fine-tuning and the Only-FT baseline: linear head, SGD, cosine, random search of (lr, wd)
    (Sec. 6.1.2); the search and retrain fields are shared (``recipes.common.FinetuneConfig``)."""

    epochs: float = field(400.0, gt=0.0)
    batch_size: int = field(256, ge=1)
    search: str = field("random", choices=("random", "grid", "none"))
    momentum: float = field(0.9, ge=0.0, lt=1.0)


@dataclass
class WarmupConfig(common.WarmupConfig):
    """Downstream head warm-up: frozen backbone, constant lr (Sec. 6.1.3)."""

    epochs: float | None = field(20.0, ge=0.0)


@dataclass
class BiSSLStageConfig(common.BiSSLStageConfig):
    """BiSSL (Algorithm 2, Sec. 6.1.3, chapter 5 variants): LARS lower level with the pretext
    momentum and trust coefficient; the fields are shared (``recipes.common.BiSSLStageConfig``)."""

    final_lr_factor: float = field(0.001, ge=0.0, le=1.0, doc="cosine ends at this × peak")


@dataclass
class VisionConfig:
    """The whole recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    bissl: BiSSLStageConfig = field(default_factory=BiSSLStageConfig)
    run: common.RunConfig = field(default_factory=lambda: common.RunConfig(out_dir="runs/vision"))
    sweep: SweepConfig = field(default_factory=SweepConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        if len(self.data.blur_sigma) != 2 or self.data.blur_sigma[0] > self.data.blur_sigma[1]:
            raise ValueError(f"data.blur_sigma: expected [low, high], got {self.data.blur_sigma}")
        if self.data.blur_kernel % 2 != 1:
            raise ValueError(f"data.blur_kernel: must be odd, got {self.data.blur_kernel}")
        if len(self.data.mean) != 3 or len(self.data.std) != 3:
            raise ValueError("data.mean and data.std: expected 3 values (RGB)")
        if (self.data.pretext == "digits") != (self.data.downstream == "digits"):
            raise ValueError("data.pretext and data.downstream: 'digits' must be used for both")

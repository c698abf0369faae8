"""The vision recipe's configuration (dataclasses; YAML files in ``recipes/configs``).

Defaults are the thesis's default setup (Sec. 6.1, DESIGN §4: ResNet-50, ImageNet); the YAML files
override what differs. Every field is validated on load (:func:`recipes.common.load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.common import field
from recipes.common.ij import IJSettings

__all__ = [
    "BiSSLStageConfig",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PretextConfig",
    "RunConfig",
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
    batch_size: int = field(1024, ge=2)
    lr: float = field(4.8, gt=0.0)
    warmup_epochs: int = field(10, ge=0)
    weight_decay: float = field(1e-6, ge=0.0)
    momentum: float = field(0.9, ge=0.0, lt=1.0)
    trust_coefficient: float = field(0.001, gt=0.0)
    temperature: float = field(0.5, gt=0.0)


@dataclass
class FinetuneConfig:
    """Fine-tuning and the Only-FT baseline: linear head, SGD, cosine (Sec. 6.1.2)."""

    epochs: int = field(400, ge=1)
    batch_size: int = field(256, ge=1)
    momentum: float = field(0.9, ge=0.0, lt=1.0)
    search_trials: int = field(50, ge=0, doc="H; 0 uses lr and weight_decay below")
    search_epochs: int = field(0, ge=0, doc="epochs per search trial; 0 = epochs")
    lr_range: list[float] = field([1e-4, 1.0], gt=0.0)
    wd_range: list[float] = field([1e-5, 1e-2], gt=0.0)
    lr: float = field(0.03, gt=0.0)
    weight_decay: float = field(1e-3, ge=0.0)
    seeds: int = field(10, ge=1, doc="retrains of the chosen config")


@dataclass
class WarmupConfig:
    """Downstream head warm-up: frozen backbone, constant lr (Sec. 6.1.3)."""

    epochs: int = field(20, ge=0)
    lr: float | None = field(None, gt=0.0, doc="None: the lr chosen for Only-FT")
    weight_decay: float | None = field(None, ge=0.0, doc="None: the wd chosen for Only-FT")


@dataclass
class BiSSLStageConfig(IJSettings):
    """BiSSL (Algorithm 2, Sec. 6.1.3, chapter 5 variants); IJ fields from ``IJSettings``."""

    lam: float = field(0.001, gt=0.0, doc="constant λ; initial λ when learnable")
    lam_schedule: str = field(
        "constant",
        choices=("constant", "cosine-decay", "cosine-increase", "exp-increase", "learnable"),
    )
    lam_min: float = field(1e-8, gt=0.0)
    lam_max: float = field(0.001, gt=0.0)
    lam_alpha: float = field(10.0, gt=0.0, doc="α of the exponential increase")
    lam_lr: float = field(0.01, gt=0.0, doc="upper-level lr of ρ for a learnable λ")
    alternations: int = field(500, ge=1, doc="T")
    lower_steps: int = field(20, ge=1, doc="N_L")
    upper_steps: int = field(8, ge=1, doc="N_U")
    grad_clip: float = field(10.0, gt=0.0)
    lower_batch_size: int = field(1024, ge=2)
    upper_batch_size: int = field(256, ge=1)
    lower_lr: float = field(1.0, gt=0.0)
    lower_weight_decay: float = field(1e-6, ge=0.0)
    lower_warmup_alternations: int = field(10, ge=0, doc="lower warm-up over N_L·this steps")
    final_lr_factor: float = field(0.001, ge=0.0, le=1.0, doc="cosine ends at this × peak")
    sync_batchnorm: bool = field(
        True, doc="under torchrun, BatchNorm statistics over all ranks (one big batch)"
    )


@dataclass
class RunConfig:
    """Where and how to run."""

    out_dir: str = "runs/vision"
    device: str = "auto"
    bf16: bool = False
    threads: int = field(0, ge=0, doc="torch CPU threads; 0 keeps torch's default")
    seed: int = field(0, ge=0, doc="first seed; retrains use seed, seed+1, ...")
    progress: bool = True


@dataclass
class SweepConfig:
    """Grids of Table 6.2 (the ``sweep`` command varies one at a time)."""

    lam: list[float] = field([1.0, 0.1, 0.01, 0.001, 0.0001], gt=0.0)
    alternations: list[int] = field([100, 200, 300, 400, 500, 600, 800, 1000], ge=1)
    upper_steps: list[int] = field([1, 2, 4, 8, 10, 12], ge=1)
    lower_steps: list[int] = field([1, 2, 5, 10, 20, 30, 40, 50], ge=1)
    finetune_epochs: list[int] = field([5, 10, 25, 50, 100, 200, 300, 400], ge=1)


@dataclass
class VisionConfig:
    """The whole recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    bissl: BiSSLStageConfig = field(default_factory=BiSSLStageConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        for name, pair in (
            ("finetune.lr_range", self.finetune.lr_range),
            ("finetune.wd_range", self.finetune.wd_range),
            ("data.blur_sigma", self.data.blur_sigma),
        ):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name}: expected [low, high] with low <= high, got {pair}")
        if self.data.blur_kernel % 2 != 1:
            raise ValueError(f"data.blur_kernel: must be odd, got {self.data.blur_kernel}")
        if len(self.data.mean) != 3 or len(self.data.std) != 3:
            raise ValueError("data.mean and data.std: expected 3 values (RGB)")
        if (self.data.pretext == "digits") != (self.data.downstream == "digits"):
            raise ValueError("data.pretext and data.downstream: 'digits' must be used for both")
        b = self.bissl
        if b.lam_schedule not in ("constant", "learnable") and b.alternations < 2:
            raise ValueError("bissl.alternations: a λ schedule needs at least 2 alternations")
        if b.lam_max < b.lam_min:
            raise ValueError(f"bissl.lam_max: {b.lam_max} is below bissl.lam_min ({b.lam_min})")

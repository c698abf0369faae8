"""The vision recipe's configuration (pydantic dataclasses; YAML files in ``recipes/configs``).

Defaults are the thesis's default setup (Sec. 6.1: ResNet-50, ImageNet); the YAML files
override what differs. Every field is validated on load (:func:`recipes.common.load_config`).
"""

from typing import Literal, get_args

from pydantic import Field, model_validator

from recipes.common import settings as common
from recipes.common.config import Bool, Float, Int, PositiveFloats, Str, config_block
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

Pretext = Literal["digits", "stl10", "imagenet", "imagefolder"]
Downstream = Literal["digits", "voc07", "dtd", "pets", "flowers", "imagefolder"]
PRETEXT = get_args(Pretext)
DOWNSTREAM = get_args(Downstream)


@config_block
class DataConfig:
    """Datasets, image sizes and augmentation choices (Sec. 6.1.1)."""

    pretext: Pretext = "imagenet"
    pretext_root: Str = ""
    downstream: Downstream = "pets"
    downstream_root: Str = ""
    image_size: Int = Field(96, ge=8)
    test_resize: Int = Field(109, ge=8)
    crop: Literal["thesis", "reference"] = "thesis"
    crop_scale_min: Float = Field(0.5, gt=0.0, le=1.0)
    blur_kernel: Int = Field(23, ge=1)
    blur_sigma: PositiveFloats = Field(default_factory=lambda: [0.1, 2.0])
    mean: list[Float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: PositiveFloats = Field(default_factory=lambda: [0.229, 0.224, 0.224])
    workers: Int = Field(8, ge=0)
    verify_images: Literal["none", "skip", "fail"] = Field(
        "none", description="decode every image up front: stop at the first bad one (fail) or "
        "leave the bad ones out and count them (skip)")
    digits_pretext: Int = Field(1000, ge=2)
    digits_train: Int = Field(250, ge=1)
    digits_val: Int = Field(200, ge=1)


@config_block
class ModelConfig:
    """Backbone and SimCLR projector."""

    backbone: Literal["small-resnet", "resnet18", "resnet50", "vit"] = "resnet50"
    width: Int = Field(16, ge=1, description="base width of small-resnet")
    small_stem: Bool = False
    proj_dim: Int = Field(256, ge=1)
    init: Str = Field("", description="a pretrained backbone to start from (torchvision, timm "
                      "or the original BiSSL code's layout; recipes.vision.init); pretext.epochs "
                      "more SimCLR epochs follow (0: the weights are used as they are)")
    vit_size: Literal["tiny", "b16"] = Field("tiny", description="vit: the vit_* sizes below "
                                             "(tiny) or ViT-B/16 (patch 16, depth 12, width 768)")
    vit_patch: Int = Field(4, ge=1, description="vit (tiny): patch size in pixels")
    vit_depth: Int = Field(2, ge=1, description="vit (tiny): transformer blocks")
    vit_width: Int = Field(32, ge=2, description="vit (tiny): embedding width")
    vit_heads: Int = Field(2, ge=1, description="vit (tiny): attention heads")
    lora_rank: Int = Field(8, ge=1, description="vit: LoRA rank of the adapters")
    lora_alpha: Float | None = Field(None, gt=0.0, description="vit: LoRA alpha (None: rank)")
    lora_targets: list[Literal["q", "k", "v", "proj", "fc1", "fc2"]] = Field(
        default_factory=lambda: ["q", "v"], description="vit: the layers that get adapters "
        "(timm's fused qkv is split into q, k, v Linears; recipes.vision.vit)")
    train_norms: Bool = Field(False, description="vit: the LayerNorms are trained (and coupled) "
                              "with the adapters")


@config_block
class PretextConfig:
    """SimCLR pretraining with LARS (Sec. 6.1.2), or a masked autoencoder (``task=mae``, ViT
    only: AdamW at ``lr``; the decoder at ``decoder_lr`` in BiSSL's lower level)."""

    task: Literal["simclr", "mae"] = "simclr"
    mask_ratio: Float = Field(0.75, gt=0.0, lt=1.0, description="mae: masked patch fraction")
    decoder_dim: Int = Field(32, ge=2, description="mae: decoder width")
    decoder_depth: Int = Field(1, ge=1, description="mae: decoder blocks")
    decoder_heads: Int = Field(2, ge=1, description="mae: decoder heads")
    decoder_lr: Float = Field(1e-4, gt=0.0, description="mae: the decoder's lr in BiSSL's lower "
                              "level")
    epochs: Int = Field(500, ge=0)
    baseline_extra_epochs: Int = Field(
        0, ge=0, description="Only-FT's backbone is pretrained on one schedule this many "
        "epochs longer, its own run from the same initial weights (Sec. 6.1.4: 100, i.e. 600 "
        "epochs against 500)"
    )
    batch_size: Int = Field(1024, ge=2)
    lr: Float = Field(4.8, gt=0.0)
    warmup_epochs: Int = Field(10, ge=0)
    weight_decay: Float = Field(1e-6, ge=0.0)
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    trust_coefficient: Float = Field(0.001, gt=0.0)
    temperature: Float = Field(0.5, gt=0.0)


@config_block
class FinetuneConfig(common.FinetuneConfig):
    """Fine-tuning and the Only-FT baseline: linear head, SGD, cosine, random search of (lr, wd)
    (Sec. 6.1.2); the search and retrain fields are shared (``recipes.common.FinetuneConfig``)."""

    epochs: Float = Field(400.0, gt=0.0)
    batch_size: Int = Field(256, ge=1)
    search: common.Search = "random"
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)


@config_block
class WarmupConfig(common.WarmupConfig):
    """Downstream head warm-up: frozen backbone, constant lr (Sec. 6.1.3)."""

    epochs: Float | None = Field(20.0, ge=0.0)


@config_block
class BiSSLStageConfig(common.BiSSLStageConfig):
    """BiSSL (Algorithm 2, Sec. 6.1.3, chapter 5 variants): LARS lower level with the pretext
    momentum and trust coefficient; the fields are shared (``recipes.common.BiSSLStageConfig``)."""

    final_lr_factor: Float = Field(0.001, ge=0.0, le=1.0, description="cosine ends at this × peak")


@config_block
class VisionConfig:
    """The whole recipe."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretext: PretextConfig = Field(default_factory=PretextConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    bissl: BiSSLStageConfig = Field(default_factory=BiSSLStageConfig)
    run: common.RunConfig = Field(default_factory=lambda: common.RunConfig(out_dir="runs/vision"))
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _data(self) -> "VisionConfig":
        if len(self.data.blur_sigma) != 2 or self.data.blur_sigma[0] > self.data.blur_sigma[1]:
            raise ValueError(f"data.blur_sigma: expected [low, high], got {self.data.blur_sigma}")
        if self.data.blur_kernel % 2 != 1:
            raise ValueError(f"data.blur_kernel: must be odd, got {self.data.blur_kernel}")
        if len(self.data.mean) != 3 or len(self.data.std) != 3:
            raise ValueError("data.mean and data.std: expected 3 values (RGB)")
        if self.pretext.task == "mae" and self.model.backbone != "vit":
            raise ValueError("pretext.task=mae needs model.backbone=vit")
        if (self.data.pretext == "digits") != (self.data.downstream == "digits"):
            raise ValueError("data.pretext and data.downstream: 'digits' must be used for both")
        return self

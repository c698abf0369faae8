"""Configuration of the GPT-GLUE recipe (defaults: the paper-scale setup, thesis Sec. 7.1).

Loaded from YAML with :func:`recipes.common.load_config`; every key is checked (unknown keys,
types and bounds), and ``key.sub=value`` overrides apply on top.
"""

from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo

from recipes.common import settings as common
from recipes.common.config import (
    FROM_CONFIG,
    Float,
    Int,
    NonNegativeFloats,
    PositiveFloats,
    Str,
    config_block,
)
from recipes.common.settings import StudyConfig, SweepConfig, WarmupConfig

from .tasks import TASKS, resolve_tasks

PAPER_LRS = [1e-6, 1.93e-6, 3.72e-6, 7.2e-6, 1.39e-5, 2.68e-5, 5.18e-5, 1e-4]
PAPER_WDS = [1e-5, 1e-4, 1e-3, 1e-2]


def _task_list(names: list[str], info: ValidationInfo) -> list[str]:
    """``data.tasks`` of a loaded config: at least one known task, none twice (``rte``, ``RTE``
    and ``R-TE`` are one; :func:`.tasks.resolve_tasks`). A ``DataConfig`` built in Python is
    checked when its tasks load."""
    if info.context and info.context.get(FROM_CONFIG):
        resolve_tasks(names)
    return names


@config_block
class ModelConfig:
    """The GPT: pretrained (hub id or directory) or built from these sizes."""

    pretrained: Str | None = Field(None, min_length=1,
                                   description="hub id or save_pretrained directory; null: build")
    tokenizer: Str | None = Field(None, min_length=1,
                                  description="tokenizer reference; null: same as pretrained")
    context: Int = Field(512, ge=8, description="k, the context window")
    width: Int = Field(768, ge=8)
    layers: Int = Field(12, ge=1)
    heads: Int = Field(12, ge=1)
    bpe_vocab: Int = Field(40478, ge=64, description="vocabulary of a locally trained BPE")
    dropout: Float = Field(0.1, ge=0.0, lt=1.0)


@config_block
class DataConfig:
    """Tasks, GLUE source and pretext corpus."""

    tasks: Annotated[list[Str], AfterValidator(_task_list)] = Field(
        default_factory=lambda: list(TASKS), description="GLUE tasks to run, each once")
    glue: Str = Field("hub",
                      description="'embedded', 'hub', or a directory with saved/TSV GLUE")
    corpus: Str = Field("hub:bookcorpus",
                        description="'embedded', hub:<name>, .txt file/dir, or saved")
    train_fraction: Float = Field(0.8, gt=0.0, lt=1.0)
    embedded_train: Int = Field(600, ge=10, description="embedded tasks: GLUE-train examples")
    embedded_test: Int = Field(300, ge=10,
                               description="embedded tasks: GLUE-validation examples")
    embedded_corpus_sentences: Int = Field(6000, ge=100)
    embedded_label_noise: Float = Field(0.05, ge=0.0, lt=0.5)


@config_block
class PretrainConfig:
    """Pretext pretraining of a freshly built GPT (the embedded run; 0 steps with real weights).

    Adam, linear warm-up then cosine, weight decay on matrices (thesis Sec. 7.1.2)."""

    steps: Int = Field(0, ge=0)
    batch_size: Int = Field(64, ge=1)
    lr: Float = Field(2.5e-4, gt=0.0)
    warmup_steps: Int = Field(2000, ge=0)
    weight_decay: Float = Field(0.01, ge=0.0)


@config_block
class FinetuneConfig(common.FinetuneConfig):
    """Downstream fine-tuning: Adam, the 8 × 4 grid search, the multi-seed retrain (Sec. 7.1.2);
    the search and retrain fields are shared (``recipes.common.FinetuneConfig``)."""

    epochs: Float = Field(3.0, gt=0.0)
    batch_size: Int = Field(32, ge=1)
    search: common.Search = "grid"
    lrs: PositiveFloats = Field(default_factory=lambda: list(PAPER_LRS))
    weight_decays: NonNegativeFloats = Field(default_factory=lambda: list(PAPER_WDS))
    warmup_fraction: Float = Field(0.002, ge=0.0, lt=1.0)
    evals_per_epoch: Int = Field(10, ge=1)
    nu: Float = Field(0.5, ge=0.0, description="weight of the auxiliary LM loss")
    head_dropout: Float = Field(0.1, ge=0.0, lt=1.0)


@config_block
class BiSSLStageConfig(common.BiSSLStageConfig):
    """The BiSSL stage (Sec. 7.1.3; damping, IJ and clipping as Sec. 6.1.3): Adam at both levels;
    the fields are shared (``recipes.common.BiSSLStageConfig``)."""

    lam: Float = Field(0.1, gt=0.0, description="constant λ; the initial σ(ρ) when learnable")
    lam_max: Float = Field(0.1, gt=0.0)
    alternations: Int = Field(200, ge=1, description="T")
    lower_steps: Int = Field(20, ge=1, description="N_L")
    upper_steps: Int = Field(4, ge=1, description="N_U")
    lower_lr: Float = Field(5e-6, gt=0.0)
    lower_weight_decay: Float = Field(0.01, ge=0.0)
    lower_batch_size: Int = Field(64, ge=1)
    upper_batch_size: Int = Field(32, ge=1)
    upper_warmup_fraction: Float = Field(0.002, ge=0.0, lt=1.0)
    checkpoint_every: Int = Field(10, ge=1,
                                  description="alternations between trainer checkpoints")


@config_block
class RecipeConfig:
    """The whole recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    bissl: BiSSLStageConfig = Field(default_factory=BiSSLStageConfig)
    run: common.RunConfig = Field(
        default_factory=lambda: common.RunConfig(out_dir="runs/gpt_glue"))
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

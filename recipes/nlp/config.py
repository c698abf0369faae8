"""Configuration of the GPT-GLUE recipe (defaults: the paper-scale setup, thesis Sec. 7.1).

Loaded from YAML with :func:`recipes.common.load_config`; every key is checked (unknown keys,
types and bounds), and ``key.sub=value`` overrides apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.common import field
from recipes.common import settings as common
from recipes.common.settings import StudyConfig, SweepConfig, WarmupConfig

from .tasks import TASKS

PAPER_LRS = [1e-6, 1.93e-6, 3.72e-6, 7.2e-6, 1.39e-5, 2.68e-5, 5.18e-5, 1e-4]
PAPER_WDS = [1e-5, 1e-4, 1e-3, 1e-2]


@dataclass
class ModelConfig:
    """The GPT: pretrained (hub id or directory) or built from these sizes."""

    pretrained: str | None = field(None, doc="hub id or save_pretrained directory; None: build")
    tokenizer: str | None = field(None, doc="tokenizer reference; None: same as pretrained")
    context: int = field(512, ge=8, doc="k, the context window")
    width: int = field(768, ge=8)
    layers: int = field(12, ge=1)
    heads: int = field(12, ge=1)
    bpe_vocab: int = field(40478, ge=64, doc="vocabulary of a locally trained BPE")
    dropout: float = field(0.1, ge=0.0, lt=1.0)


@dataclass
class DataConfig:
    """Tasks, GLUE source and pretext corpus."""

    tasks: list[str] = field(list(TASKS), doc="GLUE tasks to run")
    glue: str = field("hub", doc="'embedded', 'hub', or a directory with saved/TSV GLUE")
    corpus: str = field("hub:bookcorpus", doc="'embedded', hub:<name>, .txt file/dir, or saved")
    train_fraction: float = field(0.8, gt=0.0, lt=1.0)
    embedded_train: int = field(600, ge=10, doc="embedded tasks: GLUE-train examples")
    embedded_test: int = field(300, ge=10, doc="embedded tasks: GLUE-validation examples")
    embedded_corpus_sentences: int = field(6000, ge=100)
    embedded_label_noise: float = field(0.05, ge=0.0, lt=0.5)


@dataclass
class PretrainConfig:
    """Pretext pretraining of a freshly built GPT (the embedded run; 0 steps with real weights).

    Adam, linear warm-up then cosine, weight decay on matrices (thesis Sec. 7.1.2)."""

    steps: int = field(0, ge=0)
    batch_size: int = field(64, ge=1)
    lr: float = field(2.5e-4, gt=0.0)
    warmup_steps: int = field(2000, ge=0)
    weight_decay: float = field(0.01, ge=0.0)


@dataclass
class FinetuneConfig(common.FinetuneConfig):
    """Downstream fine-tuning: Adam, the 8 × 4 grid search, the multi-seed retrain (Sec. 7.1.2);
    the search and retrain fields are shared (``recipes.common.FinetuneConfig``)."""

    epochs: float = field(3.0, gt=0.0)
    batch_size: int = field(32, ge=1)
    search: str = field("grid", choices=("random", "grid", "none"))
    lrs: list[float] = field(PAPER_LRS, gt=0.0)
    weight_decays: list[float] = field(PAPER_WDS, ge=0.0)
    warmup_fraction: float = field(0.002, ge=0.0, lt=1.0)
    evals_per_epoch: int = field(10, ge=1)
    nu: float = field(0.5, ge=0.0, doc="weight of the auxiliary LM loss")
    head_dropout: float = field(0.1, ge=0.0, lt=1.0)


@dataclass
class BiSSLStageConfig(common.BiSSLStageConfig):
    """The BiSSL stage (Sec. 7.1.3; damping, IJ and clipping as Sec. 6.1.3): Adam at both levels;
    the fields are shared (``recipes.common.BiSSLStageConfig``)."""

    lam: float = field(0.1, gt=0.0, doc="constant λ; the initial σ(ρ) when learnable")
    lam_max: float = field(0.1, gt=0.0)
    alternations: int = field(200, ge=1, doc="T")
    lower_steps: int = field(20, ge=1, doc="N_L")
    upper_steps: int = field(4, ge=1, doc="N_U")
    lower_lr: float = field(5e-6, gt=0.0)
    lower_weight_decay: float = field(0.01, ge=0.0)
    lower_batch_size: int = field(64, ge=1)
    upper_batch_size: int = field(32, ge=1)
    upper_warmup_fraction: float = field(0.002, ge=0.0, lt=1.0)
    checkpoint_every: int = field(10, ge=1, doc="alternations between trainer checkpoints")


@dataclass
class RecipeConfig:
    """The whole recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    bissl: BiSSLStageConfig = field(default_factory=BiSSLStageConfig)
    run: common.RunConfig = field(default_factory=lambda: common.RunConfig(out_dir="runs/gpt_glue"))
    sweep: SweepConfig = field(default_factory=SweepConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

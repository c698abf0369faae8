"""The config blocks both recipes share: run, fine-tuning search, head warm-up, BiSSL stage, sweeps.

Each recipe's config composes these (``finetune``, ``warmup``, ``bissl``, ``run``, ``sweep``) and
subclasses a block only to add its own fields or change a default (e.g. the vision recipe's SGD
momentum, the GPT recipe's auxiliary LM weight ν).
"""

from typing import Literal, get_args

from pydantic import Field, model_validator

from .config import (
    Bool,
    Counts,
    Float,
    Int,
    NonNegativeFloats,
    PositiveFloats,
    Seeds,
    Str,
    config_block,
)
from .ij import IJSettings

__all__ = [
    "LAMBDA_SCHEDULES",
    "BiSSLStageConfig",
    "FinetuneConfig",
    "RunConfig",
    "StudyConfig",
    "SweepConfig",
    "WarmupConfig",
]

LamSchedule = Literal["constant", "cosine-decay", "cosine-increase", "exp-increase", "learnable"]
LAMBDA_SCHEDULES = get_args(LamSchedule)
Search = Literal["random", "grid", "none"]


@config_block
class RunConfig:
    """Where and how to run."""

    out_dir: Str = "runs/bissl"
    device: Str = "auto"
    bf16: Bool = False
    threads: Int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    seed: Int = Field(0, ge=0, description="seed of pretraining, head warm-up and BiSSL")
    progress: Bool = True
    dist_timeout_minutes: Float = Field(
        360.0, gt=0.0, description="torchrun: how long a rank waits for the others"
    )


@config_block
class FinetuneConfig:
    """Fine-tuning (Only-FT and BiSSL+FT): (lr, wd) search, then retrain over seeds.

    ``search``: ``random`` draws ``search_trials`` log-uniform pairs from the ranges (thesis Sec.
    6.1.2), ``grid`` tries every pair of ``lrs`` × ``weight_decays`` (Sec. 7.1.2), ``none`` uses
    ``lr`` and ``weight_decay``. ``select``: ``metric`` keeps the best validation metric;
    ``loss-tradeoff`` the best sum of the trial's ranks by validation metric and by validation
    loss (our reading of Sec. 6.1.2's "best overall trade-off between validation loss and
    accuracy"; ties go to the metric).
    """

    epochs: Float = Field(3.0, gt=0.0)
    batch_size: Int = Field(32, ge=1)
    search: Search = "grid"
    search_trials: Int = Field(50, ge=1, description="H, the random-search trials")
    lr_range: PositiveFloats = Field(default_factory=lambda: [1e-4, 1.0])
    wd_range: PositiveFloats = Field(default_factory=lambda: [1e-5, 1e-2])
    lrs: PositiveFloats = Field(default_factory=lambda: [1e-4],
                                description="grid search learning rates")
    weight_decays: NonNegativeFloats = Field(default_factory=lambda: [1e-2],
                                             description="grid search weight decays")
    lr: Float = Field(0.03, gt=0.0, description="search=none: the learning rate")
    weight_decay: Float = Field(1e-3, ge=0.0, description="search=none: the weight decay")
    search_epochs: Float = Field(0.0, ge=0.0, description="epochs per search trial; 0 = epochs")
    search_seed: Int = Field(0, ge=0, description="seed of the search draws and of every trial")
    seeds: Seeds = Field(default_factory=lambda: list(range(10)),
                         description="the retrains of the chosen (lr, wd)")
    select: Literal["metric", "loss-tradeoff"] = "metric"
    search_after_bissl: Bool = Field(True, description="BiSSL+FT repeats the search (Sec. 7.2)")
    warmup_fraction: Float = Field(0.0, ge=0.0, lt=1.0,
                                   description="linear lr warm-up, then cosine")
    evals_per_epoch: Int = Field(1, ge=1,
                                 description="validations per epoch (the best one is kept)")
    save_checkpoints: Bool = Field(False,
                                   description="write each retrain's best weights to out_dir")
    patience: Int | None = Field(None, ge=0, description="early stopping (Sec. 9.1): stop after "
                                 "this many validations without improvement; None or 0: off")
    min_epochs: Float = Field(0.0, ge=0.0,
                              description="early stopping: train at least this many epochs")

    @model_validator(mode="after")
    def _ranges_and_seeds(self) -> "FinetuneConfig":
        for name in ("lr_range", "wd_range"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name}: expected [low, high] with low <= high, got {pair}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        return self


@config_block
class WarmupConfig:
    """Head warm-up on the frozen pretrained backbone at a constant lr (Sec. 6.1.3, 7.1.3).

    ``None`` takes the recipe's default (epochs) or Only-FT's chosen value (lr, weight decay).
    """

    epochs: Float | None = Field(None, ge=0.0)
    lr: Float | None = Field(None, gt=0.0, description="None: the lr chosen for Only-FT")
    weight_decay: Float | None = Field(None, ge=0.0,
                                       description="None: the wd chosen for Only-FT")


@config_block
class BiSSLStageConfig(IJSettings):
    """The BiSSL stage (Algorithm 2 and the chapter 5 variants); IJ fields from ``IJSettings``.

    λ: ``lam_schedule=constant`` uses ``lam``; the schedules run from ``lam_min`` to ``lam_max``
    over ``T`` alternations (Sec. 5.2.1); ``learnable`` starts at σ(ρ) = ``lam`` and trains ρ with
    the upper level's optimiser and settings (thesis), or at ``lam_lr`` in a group of its own, its
    gradient damped by ``lam_damping`` (eq. 5.6; ``None``: the IJ's ``damping``). Learning rates:
    lower level linear warm-up over ``N_L·lower_warmup_alternations`` steps, upper level over
    ``upper_warmup_fraction`` of its ``N_U·T`` steps, then cosine to ``final_lr_factor`` × peak.
    """

    lam: Float = Field(0.001, gt=0.0, description="constant λ; the initial σ(ρ) when learnable")
    lam_schedule: LamSchedule = "constant"
    lam_min: Float = Field(1e-8, gt=0.0)
    lam_max: Float = Field(0.001, gt=0.0)
    lam_alpha: Float = Field(10.0, gt=0.0, description="α of the exponential increase")
    lam_lr: Float | None = Field(None, gt=0.0, description="lr of ρ in a group of its own "
                                 "(learnable λ); None: ρ is trained as the upper parameters are")
    lam_damping: Float | None = Field(None, ge=0.0,
                                      description="λ_damp of eq. 5.6; None: damping")
    alternations: Int = Field(500, ge=1, description="T")
    lower_steps: Int = Field(20, ge=1, description="N_L")
    upper_steps: Int = Field(8, ge=1, description="N_U")
    grad_clip: Float = Field(10.0, gt=0.0)
    lower_batch_size: Int = Field(1024, ge=1)
    upper_batch_size: Int = Field(256, ge=1)
    lower_lr: Float = Field(1.0, gt=0.0)
    lower_weight_decay: Float = Field(1e-6, ge=0.0)
    lower_warmup_alternations: Int = Field(10, ge=0,
                                           description="lower warm-up over N_L·this steps")
    upper_warmup_fraction: Float = Field(0.0, ge=0.0, lt=1.0)
    final_lr_factor: Float = Field(0.0, ge=0.0, le=1.0, description="cosine ends at this × peak")
    checkpoint_every: Int = Field(1, ge=1, description="alternations between trainer checkpoints")
    sync_batchnorm: Bool = Field(True, description="torchrun: BatchNorm statistics over all ranks")
    variant: Literal["standard", "appendix-g"] = Field(
        "standard", description="appendix-g: the pretext head regularised through the upper "
        "level (thesis appendix G; solves over ω = (θ_P, φ_P))")
    mu_g: Float = Field(1e-3, ge=0.0,
                        description="appendix-g: μ_G of the upper term μ_G/2 ‖φ_P‖²")
    monitor_every: Int = Field(0, ge=0, description="transfer monitor (Sec. 9.1) every this many "
                               "alternations; 0: off")
    monitor_samples: Int = Field(512, ge=4, description="transfer monitor: unlabelled inputs used")
    monitor_knn_k: Int = Field(10, ge=0,
                               description="transfer monitor: k of the k-NN probe; 0: none")

    @model_validator(mode="after")
    def _schedule(self) -> "BiSSLStageConfig":
        if self.lam_schedule not in ("constant", "learnable") and self.alternations < 2:
            raise ValueError("alternations: a λ schedule needs at least 2 alternations")
        if self.lam_max < self.lam_min:
            raise ValueError(f"lam_max: {self.lam_max} is below lam_min ({self.lam_min})")
        return self


@config_block
class SweepConfig:
    """The grids ``sweep --param NAME`` runs: Table 6.2 and Tables F.6-F.8 of the thesis."""

    lam: PositiveFloats = Field(default_factory=lambda: [1.0, 0.1, 0.01, 0.001, 0.0001])
    alternations: Counts = Field(default_factory=lambda: [100, 200, 300, 400, 500, 600, 800,
                                                          1000])
    upper_steps: Counts = Field(default_factory=lambda: [1, 2, 4, 8, 10, 12])
    lower_steps: Counts = Field(default_factory=lambda: [1, 2, 5, 10, 20, 30, 40, 50])
    finetune_epochs: PositiveFloats = Field(default_factory=lambda: [5, 10, 25, 50, 100, 200,
                                                                     300, 400])
    cosine_lam_max: PositiveFloats = Field(
        default_factory=lambda: [10.0, 1.0, 0.1, 0.01, 0.002, 0.001, 0.0001])
    exp_lam_max: PositiveFloats = Field(default_factory=lambda: [0.1, 0.01, 0.001, 0.0001])
    exp_alpha: PositiveFloats = Field(default_factory=lambda: [1.0, 10.0, 100.0])
    lam_init: PositiveFloats = Field(
        default_factory=lambda: [2.0, 1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001])


@config_block
class StudyConfig:
    """The ``study`` command: Only-FT against BiSSL+FT over fine-tuning budgets (the design of
    Fig. 6.5 / Table F.5) as a replicated experiment (``recipes.common.study``).

    ``replicates`` (R) independent repetitions of every stage that differs between the methods
    (head warm-up and BiSSL for BiSSL+FT, the Sec. 6.1.4 extra pretraining for Only-FT; the
    pretext stage too with ``replicate_pretext``), each seeded by its own replicate seed. Inside
    each replicate, per budget in ``epochs`` and per method, (lr, wd) is searched on the
    validation split with trials of that budget (``search_trials``; ``None`` keeps
    ``finetune.search_trials``), then retrained over ``len(seeds)`` fine-tuning seeds nested in
    the replicate (paired between the methods) and tested. The tests run over the replicates;
    their p-values are adjusted over every cell of the study by ``correction`` and a difference is
    significant when the adjusted p-value is below ``alpha``.
    """

    epochs: PositiveFloats = Field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0],
                                   description="fine-tuning budgets")
    replicates: Int = Field(5, ge=2, description="R, independent replicates of the stages "
                            "that differ between the methods")
    replicate_pretext: Bool = Field(False, description="each replicate pretrains its own "
                                    "pretext model too (else one pretext.pt is shared)")
    seeds: Seeds = Field(default_factory=lambda: list(range(4)),
                         description="fine-tuning seeds per replicate and cell (at least 2; "
                         "each replicate derives its own from these)")
    search_trials: Int | None = Field(None, ge=1, description="None: finetune.search_trials")
    alpha: Float = Field(0.05, gt=0.0, lt=1.0)
    correction: Literal["holm", "bh", "none"] = Field(
        "holm", description="multiple-testing adjustment over every cell of the study: Holm "
        "(family-wise error), Benjamini-Hochberg (false discovery rate) or none")
    wilcoxon: Bool = Field(True, description="also the Wilcoxon signed-rank test")
    bootstrap: Int = Field(2000, ge=0, description="hierarchical bootstrap resamples of the "
                           "difference (replicates, then seeds; 0: none)")

    @model_validator(mode="after")
    def _distinct(self) -> "StudyConfig":
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: at least 2 distinct seeds are needed, got {self.seeds}")
        if not self.epochs or len(set(self.epochs)) != len(self.epochs):
            raise ValueError(f"epochs: distinct budgets are needed, got {self.epochs}")
        return self

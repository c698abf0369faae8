"""The config blocks both recipes share: run, fine-tuning search, head warm-up, BiSSL stage, sweeps.

Each recipe's config composes these (``finetune``, ``warmup``, ``bissl``, ``run``, ``sweep``) and
subclasses a block only to add its own fields or change a default (e.g. the vision recipe's SGD
momentum, the GPT recipe's auxiliary LM weight ν).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import field
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

LAMBDA_SCHEDULES = ("constant", "cosine-decay", "cosine-increase", "exp-increase", "learnable")


@dataclass
class RunConfig:
    """Where and how to run."""

    out_dir: str = "runs/bissl"
    device: str = "auto"
    bf16: bool = False
    threads: int = field(0, ge=0, doc="torch CPU threads; 0 keeps torch's default")
    seed: int = field(0, ge=0, doc="seed of pretraining, head warm-up and BiSSL")
    progress: bool = True
    dist_timeout_minutes: float = field(
        360.0, gt=0.0, doc="torchrun: how long a rank waits for the others"
    )


@dataclass
class FinetuneConfig:
    """Fine-tuning (Only-FT and BiSSL+FT): (lr, wd) search, then retrain over seeds.

    ``search``: ``random`` draws ``search_trials`` log-uniform pairs from the ranges (thesis Sec.
    6.1.2), ``grid`` tries every pair of ``lrs`` × ``weight_decays`` (Sec. 7.1.2), ``none`` uses
    ``lr`` and ``weight_decay``. ``select``: ``metric`` keeps the best validation metric;
    ``loss-tradeoff`` the best sum of the trial's ranks by validation metric and by validation
    loss (our reading of Sec. 6.1.2's "best overall trade-off between validation loss and
    accuracy"; ties go to the metric).
    """

    epochs: float = field(3.0, gt=0.0)
    batch_size: int = field(32, ge=1)
    search: str = field("grid", choices=("random", "grid", "none"))
    search_trials: int = field(50, ge=1, doc="H, the random-search trials")
    lr_range: list[float] = field([1e-4, 1.0], gt=0.0)
    wd_range: list[float] = field([1e-5, 1e-2], gt=0.0)
    lrs: list[float] = field([1e-4], gt=0.0, doc="grid search learning rates")
    weight_decays: list[float] = field([1e-2], ge=0.0, doc="grid search weight decays")
    lr: float = field(0.03, gt=0.0, doc="search=none: the learning rate")
    weight_decay: float = field(1e-3, ge=0.0, doc="search=none: the weight decay")
    search_epochs: float = field(0.0, ge=0.0, doc="epochs per search trial; 0 = epochs")
    search_seed: int = field(0, ge=0, doc="seed of the search draws and of every trial")
    seeds: list[int] = field(list(range(10)), ge=0, doc="the retrains of the chosen (lr, wd)")
    select: str = field("metric", choices=("metric", "loss-tradeoff"))
    search_after_bissl: bool = field(True, doc="BiSSL+FT repeats the search (thesis Sec. 7.2)")
    warmup_fraction: float = field(0.0, ge=0.0, lt=1.0, doc="linear lr warm-up, then cosine")
    evals_per_epoch: int = field(1, ge=1, doc="validations per epoch (the best one is kept)")
    save_checkpoints: bool = field(False, doc="write each retrain's best weights to out_dir")
    patience: int | None = field(None, ge=0, doc="early stopping (Sec. 9.1): stop after this "
                                 "many validations without improvement; None or 0: off")
    min_epochs: float = field(0.0, ge=0.0, doc="early stopping: train at least this many epochs")

    def __post_init__(self) -> None:
        for name in ("lr_range", "wd_range"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name}: expected [low, high] with low <= high, got {pair}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")


@dataclass
class WarmupConfig:
    """Head warm-up on the frozen pretrained backbone at a constant lr (Sec. 6.1.3, 7.1.3).

    ``None`` takes the recipe's default (epochs) or Only-FT's chosen value (lr, weight decay).
    """

    epochs: float | None = field(None, ge=0.0)
    lr: float | None = field(None, gt=0.0, doc="None: the lr chosen for Only-FT")
    weight_decay: float | None = field(None, ge=0.0, doc="None: the wd chosen for Only-FT")


@dataclass
class BiSSLStageConfig(IJSettings):
    """The BiSSL stage (Algorithm 2 and the chapter 5 variants); IJ fields from ``IJSettings``.

    λ: ``lam_schedule=constant`` uses ``lam``; the schedules run from ``lam_min`` to ``lam_max``
    over ``T`` alternations (Sec. 5.2.1); ``learnable`` starts at σ(ρ) = ``lam`` and trains ρ with
    the upper level at ``lam_lr``, its gradient damped by ``lam_damping`` (eq. 5.6; ``None``: the
    IJ's ``damping``). Learning rates: lower level linear warm-up over
    ``N_L·lower_warmup_alternations`` steps, upper level over ``upper_warmup_fraction`` of its
    ``N_U·T`` steps, then cosine to ``final_lr_factor`` × peak.
    """

    lam: float = field(0.001, gt=0.0, doc="constant λ; the initial σ(ρ) when learnable")
    lam_schedule: str = field("constant", choices=LAMBDA_SCHEDULES)
    lam_min: float = field(1e-8, gt=0.0)
    lam_max: float = field(0.001, gt=0.0)
    lam_alpha: float = field(10.0, gt=0.0, doc="α of the exponential increase")
    lam_lr: float = field(0.01, gt=0.0, doc="upper-level lr of ρ for a learnable λ")
    lam_damping: float | None = field(None, ge=0.0, doc="λ_damp of eq. 5.6; None: damping")
    alternations: int = field(500, ge=1, doc="T")
    lower_steps: int = field(20, ge=1, doc="N_L")
    upper_steps: int = field(8, ge=1, doc="N_U")
    grad_clip: float = field(10.0, gt=0.0)
    lower_batch_size: int = field(1024, ge=1)
    upper_batch_size: int = field(256, ge=1)
    lower_lr: float = field(1.0, gt=0.0)
    lower_weight_decay: float = field(1e-6, ge=0.0)
    lower_warmup_alternations: int = field(10, ge=0, doc="lower warm-up over N_L·this steps")
    upper_warmup_fraction: float = field(0.0, ge=0.0, lt=1.0)
    final_lr_factor: float = field(0.0, ge=0.0, le=1.0, doc="cosine ends at this × peak")
    checkpoint_every: int = field(1, ge=1, doc="alternations between trainer checkpoints")
    sync_batchnorm: bool = field(True, doc="torchrun: BatchNorm statistics over all ranks")
    variant: str = field("standard", choices=("standard", "appendix-g"),
                         doc="appendix-g: the pretext head regularised through the upper level "
                         "(thesis appendix G; solves over ω = (θ_P, φ_P))")
    mu_g: float = field(1e-3, ge=0.0, doc="appendix-g: μ_G of the upper term μ_G/2 ‖φ_P‖²")
    monitor_every: int = field(0, ge=0, doc="transfer monitor (Sec. 9.1) every this many "
                               "alternations; 0: off")
    monitor_samples: int = field(512, ge=4, doc="transfer monitor: unlabelled inputs used")
    monitor_knn_k: int = field(10, ge=0, doc="transfer monitor: k of the k-NN probe; 0: none")

    def __post_init__(self) -> None:
        if self.lam_schedule not in ("constant", "learnable") and self.alternations < 2:
            raise ValueError("alternations: a λ schedule needs at least 2 alternations")
        if self.lam_max < self.lam_min:
            raise ValueError(f"lam_max: {self.lam_max} is below lam_min ({self.lam_min})")


@dataclass
class SweepConfig:
    """The grids ``sweep --param NAME`` runs: Table 6.2 and Tables F.6-F.8 of the thesis."""

    lam: list[float] = field([1.0, 0.1, 0.01, 0.001, 0.0001], gt=0.0)
    alternations: list[int] = field([100, 200, 300, 400, 500, 600, 800, 1000], ge=1)
    upper_steps: list[int] = field([1, 2, 4, 8, 10, 12], ge=1)
    lower_steps: list[int] = field([1, 2, 5, 10, 20, 30, 40, 50], ge=1)
    finetune_epochs: list[float] = field([5, 10, 25, 50, 100, 200, 300, 400], gt=0.0)
    cosine_lam_max: list[float] = field([10.0, 1.0, 0.1, 0.01, 0.002, 0.001, 0.0001], gt=0.0)
    exp_lam_max: list[float] = field([0.1, 0.01, 0.001, 0.0001], gt=0.0)
    exp_alpha: list[float] = field([1.0, 10.0, 100.0], gt=0.0)
    lam_init: list[float] = field([2.0, 1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001], gt=0.0)


@dataclass
class StudyConfig:
    """The ``study`` command: Only-FT against BiSSL+FT over fine-tuning budgets (the design of
    Fig. 6.5 / Table F.5) with paired seeds and significance tests (``recipes.common.study``).

    Per budget in ``epochs`` and per method, (lr, wd) is searched on the validation split with
    trials of that budget (``search_trials``: the random search's H; ``None`` keeps
    ``finetune.search_trials``), then the choice is retrained over ``seeds`` and tested. A
    difference is significant when the paired t-test's p-value is below ``alpha``.
    """

    epochs: list[float] = field([1.0, 2.0, 5.0, 10.0, 20.0], gt=0.0, doc="fine-tuning budgets")
    seeds: list[int] = field(list(range(8)), ge=0, doc="paired seeds per cell (at least 2)")
    search_trials: int | None = field(None, ge=1, doc="None: finetune.search_trials")
    alpha: float = field(0.05, gt=0.0, lt=1.0)
    wilcoxon: bool = field(True, doc="also the Wilcoxon signed-rank test")
    bootstrap: int = field(2000, ge=0, doc="bootstrap resamples of the CI (0: t-interval only)")

    def __post_init__(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds: at least 2 distinct seeds are needed, got {self.seeds}")
        if not self.epochs or len(set(self.epochs)) != len(self.epochs):
            raise ValueError(f"study.epochs: distinct budgets are needed, got {self.epochs}")

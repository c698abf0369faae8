"""BiSSL for vision: SimCLR pretraining -> head warm-up -> BiSSL -> fine-tuning, vs. Only-FT.

    python recipes/vision_bissl.py                       # everything, embedded digits, CPU
    python recipes/vision_bissl.py pretext               # one stage (reads earlier stages' files)
    python recipes/vision_bissl.py all --config recipes/configs/vision_small.yaml \\
        --set data.pretext_root=/data/stl10 --set data.downstream_root=/data
    python recipes/vision_bissl.py bissl --resume        # continue a killed BiSSL stage
    python recipes/vision_bissl.py sweep --param lam     # the λ grid of Table 6.2 (Table F.1)
    python recipes/vision_bissl.py study                 # Only-FT vs BiSSL+FT over FT budgets
    python recipes/vision_bissl.py --help-config         # every --set key with its default

Stages (thesis chapter 6; files in ``run.out_dir``, per downstream dataset ``<target>/``):
``pretext`` (SimCLR with LARS), ``only-ft`` (random search of (lr, wd), retrain over seeds),
``head-warmup`` (linear head on the frozen backbone), ``bissl`` (Algorithm 2), ``finetune``
(BiSSL+FT: the same procedure from θ_P), then ``report`` (``results.json``, table, plots). The
stage layer, CLI, result schema and sweeps are shared with the GPT recipe
(:mod:`recipes.common.pipeline`); this file holds what is vision's own: data, models, losses,
metrics and optimisers.

Under ``torchrun --nproc_per_node N`` BiSSL runs data-parallel (batch sizes split over the
ranks, BatchNorm synchronised), the fine-tuning trials and seed runs spread over the ranks, and
``pretext`` and ``head-warmup`` run on rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``recipes`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from implicitbilevel.bissl.lars import LARS, lars_param_groups
from recipes.common.cli import main as cli_main
from recipes.common.finetune import Objective
from recipes.common.pipeline import Recipe
from recipes.common.transfer_monitor import MonitorData
from recipes.vision.bissl_stage import bissl_losses
from recipes.vision.config import VisionConfig
from recipes.vision.init import load_backbone_init, read_backbone_state
from recipes.vision.loaders import Loaders, build_loaders
from recipes.vision.mae import MAEPretext, MaskedBatches, mae_bissl_losses, pretrain_mae
from recipes.vision.models import Downstream, Pretext, build_backbone
from recipes.vision.train import classification_objective, pretrain_simclr
from recipes.vision.vit import add_lora, base_trainable, build_vit, vit_init_state

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "vision_embedded.yaml"


class VisionRecipe(Recipe):
    """SimCLR + ResNet on one downstream dataset (the target, named after it)."""

    name = "vision"
    config_class = VisionConfig
    backbone_prefix = "backbone."
    pretrain_unit = "epochs"

    # -- data ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Open the datasets (errors name what is missing and how to get it)."""
        self.data: Loaders = build_loaders(self.cfg.data, self.device)
        self.targets = [self.cfg.data.downstream]
        self._objective = classification_objective(self.data.multilabel)
        if self.cfg.model.init:  # read and fit the pretrained backbone before any stage runs
            self.new_pretext()

    def train_loader(self, target: str, batch_size: int, seed: int,
                     shard: tuple[int, int] | None = None) -> Any:
        """Augmented, shuffled training batches."""
        return self.data.train(batch_size, seed, shard)

    def eval_loader(self, target: str, split: str) -> Any:
        """Validation or test batches (evaluation transform)."""
        bs = self.cfg.finetune.batch_size
        return self.data.val(bs) if split == "val" else self.data.test(bs)

    def pretext_loader(self, batch_size: int, seed: int, shard: tuple[int, int] | None) -> Any:
        """Two augmented views per image (MAE: one view and the mask noise)."""
        loader = self.data.pretext(batch_size, seed, shard)
        return MaskedBatches(loader, self._patches(), seed) if self._mae() else loader

    def _mae(self) -> bool:
        return self.cfg.pretext.task == "mae"

    def _patches(self) -> int:
        m = self.cfg.model
        patch = 16 if m.vit_size == "b16" else m.vit_patch
        return (self.cfg.data.image_size // patch) ** 2

    # -- models -------------------------------------------------------------------------------

    def new_backbone(self) -> nn.Module:
        """A ResNet of the configured kind, or a frozen ViT with LoRA adapters
        (:mod:`recipes.vision.vit`)."""
        m = self.cfg.model
        if m.backbone == "vit":
            vit = build_vit(self.cfg.data.image_size, size=m.vit_size, patch=m.vit_patch,
                            depth=m.vit_depth, width=m.vit_width, heads=m.vit_heads)
            return add_lora(vit, m.lora_rank, m.lora_targets, m.lora_alpha, m.train_norms)
        return build_backbone(m.backbone, width=m.width, small_stem=m.small_stem)

    def external_weights(self) -> bool:
        """Whether the backbone starts from ``model.init`` (a pretrained checkpoint)."""
        return bool(self.cfg.model.init)

    def new_pretext(self) -> nn.Module:
        """Backbone (from ``model.init`` when given) + SimCLR projector (or MAE decoder)."""
        p = self.cfg.pretext
        pretext: nn.Module = (
            MAEPretext(self.new_backbone(), self.cfg.data.image_size, p.mask_ratio, p.decoder_dim,
                       p.decoder_depth, p.decoder_heads)
            if self._mae() else Pretext(self.new_backbone(), self.cfg.model.proj_dim))
        if self.cfg.model.init:
            if getattr(self, "_init_state", None) is None:
                self._init_state = read_backbone_state(self.cfg.model.init)
            state = self._init_state
            if self.cfg.model.backbone == "vit":  # a timm ViT's fused qkv onto split q, k, v
                state = vit_init_state(pretext.backbone, state)
            load_backbone_init(pretext.backbone, state, self.cfg.model.init)
        return pretext

    def downstream_from(self, pretext: nn.Module, target: str) -> nn.Module:
        """A fresh linear head on a copy of ``pretext``'s backbone."""
        backbone = self.new_backbone()
        backbone.load_state_dict(pretext.backbone.state_dict())
        return Downstream(backbone, self.data.num_classes).to(self.device)

    # -- losses, metrics, optimisers ------------------------------------------------------------

    def objective(self, target: str) -> Objective:
        """Cross-entropy; top-1/top-5, or 11-point mAP for VOC07."""
        return self._objective

    def report_metrics(self, target: str) -> list[str]:
        """Top-1 and top-5 (mAP for multi-label data)."""
        return ["map"] if self.data.multilabel else ["top1", "top5"]

    def optimizer(self, named: list[tuple[str, nn.Parameter]], lr: float,
                  weight_decay: float) -> torch.optim.Optimizer:
        """SGD with momentum (fine-tuning, head warm-up, BiSSL upper level)."""
        return torch.optim.SGD([p for _, p in named], lr=lr, momentum=self.cfg.finetune.momentum,
                               weight_decay=weight_decay)

    def lower_optimizer(self, pretext: nn.Module) -> torch.optim.Optimizer:
        """LARS at ``bissl.lower_lr`` with the pretext momentum and trust coefficient (ViT:
        AdamW, the adapters at ``bissl.lower_lr``, an MAE decoder at ``pretext.decoder_lr``)."""
        b, p = self.cfg.bissl, self.cfg.pretext
        if self.cfg.model.backbone == "vit":
            named = list(pretext.named_parameters())
            head_lr = p.decoder_lr if self._mae() else b.lower_lr
            return torch.optim.AdamW(
                [{"params": [q for n, q in named if n.startswith("backbone.")]},
                 {"params": [q for n, q in named if not n.startswith("backbone.")],
                  "lr": head_lr}], lr=b.lower_lr, weight_decay=b.lower_weight_decay)
        return LARS(lars_param_groups(pretext, b.lower_weight_decay), lr=b.lower_lr,
                    momentum=p.momentum, weight_decay=b.lower_weight_decay,
                    trust_coefficient=p.trust_coefficient)

    def bissl_losses(self, pretext: nn.Module, downstream: nn.Module, target: str) -> Any:
        """NT-Xent (or the MAE loss) below, cross-entropy above."""
        if self._mae():
            return mae_bissl_losses(pretext, downstream)
        return bissl_losses(pretext, downstream, self.cfg.pretext.temperature)

    def monitor_data(self, target: str, pretext: nn.Module) -> MonitorData:
        """Pretext views of the unlabelled validation images, θ_P's backbone features, the
        labelled validation split as the k-NN probe."""
        bs, device = self.cfg.finetune.batch_size, self.device
        return MonitorData(self.data.monitor_views(bs),
                           lambda x: pretext.backbone(x.to(device)), modules=[pretext],
                           probe=self.data.val(bs), limit=self.cfg.bissl.monitor_samples)

    # -- pretext stage ------------------------------------------------------------------------

    def baseline_extra(self) -> bool:
        """Sec. 6.1.4: Only-FT's backbone is pretrained ``pretext.baseline_extra_epochs`` longer."""
        return self.cfg.pretext.baseline_extra_epochs > 0

    def pretrain(self, model: nn.Module, extra: bool = False) -> list[float]:
        """SimCLR with LARS (ViT: MAE or SimCLR on the adapters); ``extra``: the Only-FT
        baseline's run, one schedule of ``epochs + baseline_extra_epochs`` (the same warm-up,
        then one cosine to the end; Sec. 6.1.4). Returns the loss of every epoch."""
        p, run = self.cfg.pretext, self.cfg.run
        epochs = p.epochs + (p.baseline_extra_epochs if extra else 0)
        if self.cfg.model.backbone == "vit":  # the base weights are pretrained, then frozen
            with base_trainable(model.backbone):
                if self._mae():
                    return pretrain_mae(
                        model, self.pretext_loader(p.batch_size, run.seed + int(extra), None),
                        epochs=epochs, lr=p.lr, weight_decay=p.weight_decay, device=self.device,
                        warmup_epochs=p.warmup_epochs, progress=self.progress)
                return self._simclr(model, epochs, extra)
        return self._simclr(model, epochs, extra)

    def _simclr(self, model: nn.Module, epochs: int, extra: bool) -> list[float]:
        p, run = self.cfg.pretext, self.cfg.run
        return pretrain_simclr(
            model, self.data.pretext(p.batch_size, run.seed + int(extra)),
            epochs=epochs, lr=p.lr, warmup_epochs=p.warmup_epochs,
            weight_decay=p.weight_decay, momentum=p.momentum,
            trust_coefficient=p.trust_coefficient, temperature=p.temperature,
            device=self.device, bf16=run.bf16, progress=self.progress,
        )


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command line (see the module docstring); returns the results of ``all``."""
    return cli_main(VisionRecipe, argv, DEFAULT_CONFIG, __doc__ or "")


if __name__ == "__main__":
    main()

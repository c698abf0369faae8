"""GPT on GLUE: the conventional pipeline (Only-FT) against BiSSL + FT (thesis chapter 7).

    python recipes/gpt_glue_bissl.py
        the embedded default: a small GPT, a locally trained BPE, a template corpus and seven
        synthetic GLUE-format tasks; nothing is downloaded.
    python recipes/gpt_glue_bissl.py --config recipes/configs/gpt_glue_paper.yaml \\
            --set model.pretrained=DIR --set data.glue=GLUE_DIR --set data.corpus=BOOKS_DIR
        the paper setup (117M GPT, BooksCorpus, GLUE).
    python recipes/gpt_glue_bissl.py bissl --resume      # continue a killed BiSSL stage
    python recipes/gpt_glue_bissl.py sweep --param lam   # the λ grid of Table 6.2, every task
    python recipes/gpt_glue_bissl.py sweep --param lam_init --set bissl.lam_damping=10
        the learnable-λ initialisations of Table F.8 (run it with lam_damping=0 and 10)
    python recipes/gpt_glue_bissl.py study               # Only-FT vs BiSSL+FT over FT budgets
    python recipes/gpt_glue_bissl.py --help-config       # every --set key with its default
    torchrun --nproc_per_node 4 recipes/gpt_glue_bissl.py ... (same arguments)

Stages, per GLUE task (``<task>/`` in ``run.out_dir``): ``pretext`` (next-token pretraining of
a freshly built GPT, or the pretrained weights), ``only-ft`` (the grid search of (lr, wd) and
the multi-seed retrain), ``head-warmup`` (frozen backbone), ``bissl`` (Algorithm 2),
``finetune`` (BiSSL+FT: the same search and retrain from θ_P, Sec. 7.2), then ``report``. The
stage layer, CLI, result schema and sweeps are shared with the vision recipe
(:mod:`recipes.common.pipeline`); this file holds what is GPT's own: tokenizer, tasks, models,
losses, metrics and Adam.

Under ``torchrun`` BiSSL runs data-parallel (each rank a shard of both levels' batches), the
search trials and seed runs are spread over the ranks (same results as one process), and
``pretext`` and ``head-warmup`` run on rank 0; rank 0 alone prints and writes.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from recipes.common.cli import main as cli_main  # noqa: E402
from recipes.common.finetune import Objective  # noqa: E402
from recipes.common.pipeline import Recipe  # noqa: E402
from recipes.common.runtime import derive_seed  # noqa: E402
from recipes.nlp.bissl_stage import bissl_losses  # noqa: E402
from recipes.nlp.config import RecipeConfig  # noqa: E402
from recipes.nlp.data import TaskData, load_task, make_tokenizer, pretext_loader  # noqa: E402
from recipes.nlp.finetune import adam_param_groups, gpt_objective, task_loader  # noqa: E402
from recipes.nlp.hub import resolve_pretrained  # noqa: E402
from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, build_gpt  # noqa: E402
from recipes.nlp.monitor import gpt_monitor_data  # noqa: E402
from recipes.nlp.pretrain import pretrain  # noqa: E402
from recipes.nlp.tokenizer import TextEncoder, bpe_from_json  # noqa: E402

DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "gpt_glue_embedded.yaml"


class GPTRecipe(Recipe):
    """A GPT on GLUE tasks (the targets, one per task)."""

    name = "gpt-glue"
    config_class = RecipeConfig
    backbone_prefix = "gpt."

    # -- tokenizer and data --------------------------------------------------------------------

    def setup(self) -> None:
        """The tokenizer, the GPT's shape and every task (a missing one fails before training)."""
        m = self.cfg.model
        self._pretrained = None
        if m.pretrained is not None:
            self._pretrained = build_gpt(pretrained=resolve_pretrained(m.pretrained, "model"),
                                         dropout=m.dropout)
            self.encoder = self.shared_tokenizer(self._pretrained.config.vocab_size)
            self.context = min(m.context, self._pretrained.config.n_positions)
        else:
            self.encoder = self.shared_tokenizer(None)
            self.context = m.context
        if self.dist.is_main:
            self.encoder.save(self.out)  # the token ids of this run, for reuse of its checkpoints
        self.tasks: dict[str, TaskData] = {
            name: load_task(name, self.cfg.data, self.encoder, self.context)
            for name in self.cfg.data.tasks
        }
        self.targets = list(self.tasks)
        self.say(f"GPT: vocabulary {self.encoder.vocab_size} ({self.encoder.source}), context "
                 f"{self.context}" + (f"; {self.dist.world_size} ranks"
                                      if self.dist.world_size > 1 else ""))
        for name, t in self.tasks.items():
            self.say(f"{name}: {len(t.train)} train / {len(t.val)} val / {len(t.test)} test "
                     f"({t.dropped} dropped for length)")

    def shared_tokenizer(self, expected_vocab: int | None) -> TextEncoder:
        """The run's tokenizer: the saved one, or a BPE trained on rank 0 and sent to the others
        (every rank maps text to the same ids; a real corpus is read once)."""
        m, saved = self.cfg.model, self.out / "tokenizer.json"
        trained = (m.tokenizer if m.tokenizer is not None else m.pretrained) is None
        if trained and saved.exists():
            return bpe_from_json(saved.read_text())
        if self.dist.world_size == 1 or not trained:
            return make_tokenizer(m, self.cfg.data, expected_vocab=expected_vocab)
        payload: list[Any] = [None]
        if self.dist.is_main:
            payload[0] = make_tokenizer(m, self.cfg.data, expected_vocab).tokenizer.to_str()
        dist.broadcast_object_list(payload, src=0)
        return bpe_from_json(payload[0])

    def train_loader(self, target: str, batch_size: int, seed: int,
                     shard: tuple[int, int] | None = None) -> Any:
        """Shuffled task batches; full batches only when the (rank's) split holds more."""
        train, world = self.tasks[target].train, shard[1] if shard else 1
        return task_loader(train, batch_size, shuffle=True, seed=seed,
                           drop_last=len(train) // world > batch_size, shard=shard)

    def eval_loader(self, target: str, split: str) -> Any:
        """Validation or test batches in order."""
        return task_loader(getattr(self.tasks[target], split), 64, shuffle=False)

    def pretext_loader(self, batch_size: int, seed: int, shard: tuple[int, int] | None) -> Any:
        """Corpus chunks for the lower level: ``T·(N_L + 1)`` batches a pass."""
        b = self.cfg.bissl
        return pretext_loader(self.cfg.data, self.encoder, self.context, batch_size,
                              num_batches=b.alternations * (b.lower_steps + 1), shard=shard,
                              seed=seed)

    # -- models -------------------------------------------------------------------------------

    def external_weights(self) -> bool:
        """A pretrained GPT's weights come from ``model.pretrained``, not ``pretext.pt``."""
        return self._pretrained is not None

    def new_pretext(self) -> nn.Module:
        """The GPT with its tied LM head: pretrained, or built from ``model.*``."""
        m = self.cfg.model
        if self._pretrained is not None:
            return GPTPretextModel(copy.deepcopy(self._pretrained))
        return GPTPretextModel(build_gpt(vocab_size=self.encoder.vocab_size, context=m.context,
                                         width=m.width, layers=m.layers, heads=m.heads,
                                         dropout=m.dropout))

    def downstream_from(self, pretext: nn.Module, target: str) -> nn.Module:
        """A copy of the GPT with new-token rows and a task head φ_D."""
        spec = self.tasks[target].spec
        model = GPTDownstreamModel(copy.deepcopy(pretext.gpt), spec.num_special_tokens,
                                   spec.num_outputs, self.cfg.finetune.head_dropout)
        return model.to(self.device)

    def warmup_epochs(self, target: str) -> float:
        """``warmup.epochs``, else the task's (Sec. 7.1.3)."""
        w = self.cfg.warmup.epochs
        return self.tasks[target].spec.head_warmup_epochs if w is None else w

    # -- losses, metrics, optimisers ------------------------------------------------------------

    def objective(self, target: str) -> Objective:
        """Task loss + ν·LM loss; the task's GLUE metric."""
        return gpt_objective(self.tasks[target].spec, self.cfg.finetune.nu)

    def optimizer(self, named: list[tuple[str, nn.Parameter]], lr: float,
                  weight_decay: float) -> torch.optim.Optimizer:
        """Adam, weight decay on matrices only."""
        return torch.optim.AdamW(adam_param_groups(named, weight_decay), lr=lr)

    def lower_optimizer(self, pretext: nn.Module) -> torch.optim.Optimizer:
        """Adam at ``bissl.lower_lr``."""
        b = self.cfg.bissl
        return self.optimizer(list(pretext.named_parameters()), b.lower_lr, b.lower_weight_decay)

    def bissl_losses(self, pretext: nn.Module, downstream: nn.Module, target: str) -> Any:
        """Next-token loss below, task + ν·LM loss above."""
        return bissl_losses(downstream, pretext, self.tasks[target].spec, self.cfg.finetune.nu)

    def monitor_data(self, target: str, pretext: nn.Module) -> Any:
        """Token-deletion views of the validation texts, θ_P's mean-pooled hidden states, the
        labelled validation split as the k-NN probe (classification tasks)."""
        task = self.tasks[target]
        return gpt_monitor_data(pretext, task.spec, task.val, self.device,  # type: ignore[arg-type]
                                self.cfg.bissl.monitor_samples)

    # -- pretext stage ------------------------------------------------------------------------

    def pretrain(self, model: nn.Module, extra: bool = False) -> list[float]:
        """``pretrain.steps`` of next-token pretraining (none for a pretrained GPT)."""
        p = self.cfg.pretrain
        if not p.steps:
            return []
        seed = derive_seed(self.cfg.run.seed, "pretrain")
        loader = pretext_loader(self.cfg.data, self.encoder, self.context, p.batch_size,
                                num_batches=p.steps, seed=seed)
        return pretrain(model, loader, p, self.device, progress=self.progress)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command line (see the module docstring); returns the results of ``all``."""
    return cli_main(GPTRecipe, argv, DEFAULT_CONFIG, __doc__ or "")


if __name__ == "__main__":
    main()

"""CPU proxies of the three paper networks of :mod:`benchmarks.paper_scale_ij`, built from the
recipe configs, and their short pretraining (the training-length axis).

- ``resnet18``: the torchvision ResNet-18 of ``recipes/configs/vision_small.yaml`` (its
  ``model.backbone``, ``model.proj_dim``, ``data.image_size`` and ``pretext.temperature``) with
  the SimCLR projector, on the embedded digits rendered at the config's image size;
- ``resnet50``: the ResNet-50 of ``recipes/configs/vision_default.yaml``, at a reduced image size;
- ``gpt``: the GPT of ``recipes/configs/gpt_glue_paper.yaml`` (``OpenAIGPTLMHeadModel``, 12
  layers, 768 wide, tied embedding, eager attention) with a small BPE vocabulary trained on the
  recipe's synthetic corpus and a short context, and the ``sst2`` downstream formatting.

The losses are the recipes' own (:func:`benchmarks.pretrained.vision_losses`, i.e.
``recipes.vision.bissl_stage.bissl_losses`` with NT-Xent of ``recipes/vision/losses.py``;
``recipes.nlp.bissl_stage.bissl_losses``), with their Gauss–Newton splits (NT-Xent logits +
cross-entropy; LM logits + next-token cross-entropy). Pretraining: SimCLR steps (NT-Xent on two
batched views of ``recipes.vision.augment.pretext_batch_views``) for the ResNets, next-token steps
for the GPT, both with Adam (the recipes use LARS at batch 1024 and AdamW; at these batch sizes and
step counts Adam moves the network away from its initialisation far enough to change the
curvature, which is what the axis is for). Dropout is 0 in the GPT (a fixed matrix per system).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .harness import ROOT
from .pretrained import Network, vision_losses

__all__ = ["Proxy", "ProxySpec", "load_config", "pretrain_snapshots"]

CONFIGS = ROOT / "recipes" / "configs"


def load_config(name: str) -> dict[str, Any]:
    """A recipe config as a plain dict."""
    with open(CONFIGS / name) as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class ProxySpec:
    """One paper network's CPU proxy: which config, what was shrunk, the training lengths."""

    key: str
    config: str
    image_size: int = 96          # vision: input resolution
    lower_pairs: int = 8          # vision: image pairs of the Hessian batch; GPT: sequences
    upper_batch: int = 8          # downstream batch of one upper step
    context: int = 32             # GPT: tokens per sequence
    vocab: int = 512              # GPT: BPE vocabulary (before the 3 special tokens)
    width: int = 768              # GPT: hidden width (12 heads)
    train_batch: int = 16         # pretraining batch (pairs / sequences)
    lr: float = 1e-3              # pretraining Adam learning rate
    steps: tuple[int, ...] = (0, 20, 100)  # the training-length axis (cumulative steps)


@dataclass
class Proxy:
    """A proxy network ready for measurement at one training length."""

    network: Network
    config: dict[str, Any]
    spec: ProxySpec
    steps: int
    mfac_gradients: list[dict[str, Tensor]]
    pretrain_losses: list[float]
    pretrain_seconds: float


# -- data ----------------------------------------------------------------------------------------


def _vision_data(size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Embedded digits at ``size`` px: pretext images, downstream images and labels."""
    from recipes.vision.data import digits_splits

    splits = digits_splits(size=size, n_pretext=1000, n_train=250, n_val=100)
    return (splits["pretext"].tensors[0], splits["train"].tensors[0],
            splits["train"].tensors[1])


def _gpt_data(spec: ProxySpec, seed: int) -> tuple[Tensor, Any, Any, int]:
    """Token chunks of the synthetic corpus, sst2 inputs and the vocabulary size."""
    from recipes.nlp.synthetic import pretext_corpus, synthetic_task
    from recipes.nlp.tasks import SpecialTokens, format_example, get_task
    from recipes.nlp.tokenizer import train_bpe

    corpus = pretext_corpus(4000, seed)
    enc = train_bpe(corpus, spec.vocab)
    ids = [t for text in enc.encode_batch(corpus) for t in text]
    n = len(ids) // spec.context
    chunks = torch.tensor(ids[: n * spec.context]).view(n, spec.context)
    task = get_task("sst2")
    train, _ = synthetic_task("sst2", 200, 1, seed)
    special = SpecialTokens(enc.vocab_size)
    seqs = [format_example(task, enc(a)[: spec.context - 2], None, special)[0]
            for a in train.texts_a]
    inputs = torch.zeros(len(seqs), 1, spec.context, dtype=torch.long)
    lengths = torch.tensor([[len(s)] for s in seqs])
    for i, s in enumerate(seqs):
        inputs[i, 0, : len(s)] = torch.tensor(s)
    labels = torch.tensor([int(x) for x in train.labels])
    return chunks, (inputs, lengths, labels), task, enc.vocab_size


# -- models --------------------------------------------------------------------------------------


def _vision_models(cfg: dict[str, Any], num_classes: int) -> tuple[nn.Module, Callable]:
    from recipes.vision.models import Pretext, build_backbone

    m = cfg["model"]
    pretext = Pretext(build_backbone(m["backbone"]), m.get("proj_dim", 256))

    def downstream_of(pre: nn.Module) -> nn.Module:
        from recipes.vision.models import Downstream

        return Downstream(copy.deepcopy(pre.backbone), num_classes)

    return pretext, downstream_of


def _gpt_models(cfg: dict[str, Any], spec: ProxySpec, vocab: int, task: Any
                ) -> tuple[nn.Module, Callable]:
    from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, build_gpt

    gpt = build_gpt(vocab_size=vocab, context=spec.context, width=spec.width, layers=12,
                    heads=12, dropout=0.0)
    gpt.config._attn_implementation = "eager"
    pretext = GPTPretextModel(gpt)

    def downstream_of(pre: nn.Module) -> nn.Module:
        torch.manual_seed(1)
        return GPTDownstreamModel(copy.deepcopy(pre.gpt), task.num_special_tokens,
                                  task.num_outputs, 0.0)

    return pretext, downstream_of


# -- build and pretrain --------------------------------------------------------------------------


def pretrain_snapshots(spec: ProxySpec, m_fac: int, upper_steps: int, seed: int = 0,
                       log: Callable[[str], None] = print) -> list[Proxy]:
    """The proxy at each training length of ``spec.steps`` (one run, snapshots on the way).

    Each snapshot carries one fixed Hessian batch, ``upper_steps`` downstream batches and the
    backbone gradients of the last ``m_fac`` pretraining steps (at initialisation: gradients on
    ``m_fac`` batches without steps) for M-FAC's window.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = load_config(spec.config)
    vision = spec.key != "gpt"
    if vision:
        from recipes.vision.augment import pretext_batch_views
        from recipes.vision.losses import nt_xent

        images, down_x, down_y = _vision_data(spec.image_size, seed)
        views = pretext_batch_views(spec.image_size, blur_kernel=3)
        pretext, downstream_of = _vision_models(cfg, 10)
        tau = float(cfg["pretext"]["temperature"])
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.224]).view(1, 3, 1, 1)

        def lower_batch(n: int) -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, images.shape[0], (n,), generator=gen)
            x = images[idx]
            return views[0](x, gen), views[1](x, gen)

        def pretext_loss(model: nn.Module, batch: Any) -> Tensor:
            return nt_xent(model(batch[0]), model(batch[1]), tau)

        def upper_batch(n: int) -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, down_x.shape[0], (n,), generator=gen)
            return (down_x[idx] - mean) / std, down_y[idx]

        def losses_of(pre: nn.Module, down: nn.Module) -> Any:
            return vision_losses(tau)
        backbone_prefix = "backbone."
    else:
        from recipes.nlp.bissl_stage import bissl_losses
        from recipes.nlp.losses import next_token_loss

        chunks, (inputs, lengths, labels), task, vocab = _gpt_data(spec, seed)
        pretext, downstream_of = _gpt_models(cfg, spec, vocab, task)
        nu = 0.5

        def lower_batch(n: int) -> Tensor:
            return chunks[torch.randint(0, chunks.shape[0], (n,), generator=gen)]

        def pretext_loss(model: nn.Module, batch: Any) -> Tensor:
            return next_token_loss(model(batch), batch)

        def upper_batch(n: int) -> tuple[Tensor, Tensor, Tensor]:
            idx = torch.randint(0, labels.shape[0], (n,), generator=gen)
            return inputs[idx], lengths[idx], labels[idx]

        def losses_of(pre: nn.Module, down: nn.Module) -> Any:
            def build(downstream: nn.Module, pretext: nn.Module, dtype: torch.dtype,
                      frozen: bool) -> tuple:
                ls = bissl_losses(downstream, pretext, task, nu)  # type: ignore[arg-type]
                return ls.downstream, ls.pretext, ls.gauss_newton
            return build
        backbone_prefix = "gpt."

    pretext.train()
    opt = torch.optim.Adam(pretext.parameters(), lr=spec.lr,
                           weight_decay=float(cfg.get("pretext", {}).get("weight_decay", 0.0))
                           if vision else 0.0)
    names = [n for n, _ in pretext.named_parameters() if n.startswith(backbone_prefix)]
    params = dict(pretext.named_parameters())
    window: list[dict[str, Tensor]] = []
    losses: list[float] = []
    snapshots: list[Proxy] = []
    done, started = 0, time.perf_counter()

    def grads_now(step: bool) -> float:
        opt.zero_grad(set_to_none=True)
        loss = pretext_loss(pretext, lower_batch(spec.train_batch))
        loss.backward()
        window.append({n: params[n].grad.detach().clone() for n in names})
        del window[:-m_fac]
        if step:
            opt.step()
        return float(loss.detach())

    for target in spec.steps:
        while done < target:
            losses.append(grads_now(step=True))
            done += 1
            if done % 10 == 0:
                log(f"    [{spec.key}] pretraining step {done}/{spec.steps[-1]}: loss "
                    f"{losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
        if target == 0:
            for _ in range(m_fac):
                grads_now(step=False)
        pre = copy.deepcopy(pretext).train()
        down = downstream_of(pre).train()
        net = Network(
            name=f"{spec.key} @ {target} steps", downstream=down, pretext=pre,
            losses=losses_of(pre, down),
            backbone=[n for n, _ in down.named_parameters() if n.startswith(backbone_prefix)],
            lower_batch=lower_batch(spec.lower_pairs),
            upper_batches=[upper_batch(spec.upper_batch) for _ in range(upper_steps)],
            note=_note(spec, cfg),
        )
        snapshots.append(Proxy(net, cfg, spec, target, [dict(g) for g in window],
                               list(losses), time.perf_counter() - started))
    return snapshots


def _note(spec: ProxySpec, cfg: dict[str, Any]) -> str:
    if spec.key == "gpt":
        return (f"{spec.config}: OpenAIGPTLMHeadModel 12 layers x {spec.width} wide (paper "
                f"768; eager attention), BPE "
                f"vocabulary {spec.vocab} + 3 special, context {spec.context} (paper 512), "
                f"Hessian batch {spec.lower_pairs}x{spec.context} tokens (paper "
                f"{cfg['bissl']['lower_batch_size']}x512), upper batch {spec.upper_batch} "
                f"(paper {cfg['bissl']['upper_batch_size']}), synthetic corpus / sst2")
    return (f"{spec.config}: torchvision {cfg['model']['backbone']} + SimCLR projector, "
            f"{spec.image_size} px (paper {cfg['data']['image_size']}), Hessian batch "
            f"{spec.lower_pairs} image pairs (paper {cfg['bissl']['lower_batch_size']}), upper "
            f"batch {spec.upper_batch} (paper {cfg['bissl']['upper_batch_size']}), embedded "
            f"digits, 10-class head")

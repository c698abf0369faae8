"""Vision Transformers with LoRA adapters for the BiSSL vision recipe (``model.backbone=vit``).

**The backbone** is timm's :class:`~timm.models.vision_transformer.VisionTransformer` with no
classifier (``num_classes=0``, class-token pooling): a tiny one for the embedded digits (patch 4,
depth 2, width 32) or ViT-B/16 (patch 16, depth 12, width 768, 12 heads) for the paper config.

**q and v adapters on timm's fused qkv.** timm computes the query, key and value with one
``Linear(d, 3d)`` (``attn.qkv``). :class:`SplitQKV` replaces it by three ``Linear(d, d)``
children ``q``, ``k``, ``v`` holding the slices of the fused weight and bias (its output is their
concatenation, equal to the fused layer's), so that Hugging Face ``peft`` targets the query and
value projections by name: ``LoraConfig(target_modules=r".*\\.attn\\.(q|v)$")``
(``model.lora_targets``, any of ``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``). The adapters
are ``W x + (α/r) B A x`` with ``B = 0`` at the start (the model's output is unchanged).

**Frozen backbone.** Every backbone weight other than the adapters (and, with
``model.train_norms``, the LayerNorms) becomes a *buffer* (:func:`freeze_to_buffers`): it is in
the state dict, so checkpoints and copies carry it, but not in ``named_parameters()``. So the
parameters of the pretext and downstream models, and hence of the bilevel problem, are the
adapters (``backbone.*lora_*``) and the heads only; the proximal regulariser couples the two
adapter sets θ_P and θ_D by their common names, as it couples backbone weights of a ResNet. The
pretext stage pretrains the base weights themselves (:func:`base_trainable` turns them into
parameters for that stage only), or ``model.init`` gives them: a timm ViT checkpoint (fused
``qkv``, e.g. an MAE ViT-B/16) is mapped onto this layout by :func:`vit_init_state`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SplitQKV", "add_lora", "base_trainable", "build_vit", "freeze_to_buffers",
           "vit_init_state"]

SIZES = {"tiny": {}, "b16": dict(patch=16, depth=12, width=768, heads=12)}


class SplitQKV(nn.Module):
    """timm's fused ``qkv`` Linear as three Linears ``q``, ``k``, ``v`` (same output)."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        d = fused.out_features // 3
        bias = fused.bias is not None
        for i, name in enumerate("qkv"):
            layer = nn.Linear(fused.in_features, d, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(fused.weight[i * d:(i + 1) * d])
                if bias:
                    layer.bias.copy_(fused.bias[i * d:(i + 1) * d])
            self.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        """``[q(x), k(x), v(x)]`` concatenated on the last axis."""
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def build_vit(image_size: int, *, size: str = "tiny", patch: int = 4, depth: int = 2,
              width: int = 32, heads: int = 2) -> nn.Module:
    """A randomly initialised timm ViT with no classifier, ``out_dim`` set and the attention
    computed explicitly (``fused_attn`` off: double-differentiable for Hessian products).

    ``size="b16"`` is ViT-B/16 (timm's ``vit_base_patch16_224`` layout at ``image_size``); its
    patch, depth, width and heads replace the keyword arguments, which set the ``"tiny"`` one."""
    from timm.models.vision_transformer import VisionTransformer

    s = {**dict(patch=patch, depth=depth, width=width, heads=heads), **SIZES[size]}  # size wins
    if image_size % s["patch"]:
        raise ValueError(f"model.vit_patch={s['patch']} must divide data.image_size={image_size}")
    net = VisionTransformer(img_size=image_size, patch_size=s["patch"], embed_dim=s["width"],
                            depth=s["depth"], num_heads=s["heads"], num_classes=0)
    for block in net.blocks:
        block.attn.fused_attn = False
        block.attn.qkv = SplitQKV(block.attn.qkv)
    net.out_dim = s["width"]
    net.patch = s["patch"]
    return net


def add_lora(net: nn.Module, rank: int, targets: Sequence[str], alpha: float | None = None,
             train_norms: bool = False) -> nn.Module:
    """Inject ``peft`` LoRA adapters of rank ``rank`` into the attention (``q``, ``k``, ``v``,
    ``proj``) or MLP (``fc1``, ``fc2``) layers named in ``targets``, then freeze the rest
    (:func:`freeze_to_buffers`). ``alpha`` defaults to ``rank`` (scale 1)."""
    from peft import LoraConfig, inject_adapter_in_model

    where = {"q": r"attn\.qkv\.q", "k": r"attn\.qkv\.k", "v": r"attn\.qkv\.v",
             "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}
    unknown = sorted(set(targets) - set(where))
    if unknown or not targets:
        raise ValueError(f"model.lora_targets: choose from {sorted(where)}, got {list(targets)}")
    pattern = r".*\.(" + "|".join(where[t] for t in targets) + r")$"
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=pattern, bias="none")
    inject_adapter_in_model(config, net)
    freeze_to_buffers(net, train_norms)
    return net


def _trained(name: str, train_norms: bool) -> bool:
    return "lora_" in name or (train_norms and ("norm" in name.rsplit(".", 2)[-2:][0]))


def freeze_to_buffers(net: nn.Module, train_norms: bool = False) -> None:
    """Turn every parameter but the adapters (and with ``train_norms`` the norm layers) into a
    buffer of the same name (``net.frozen_names`` lists them)."""
    frozen = []
    for full, _ in list(net.named_parameters()):
        if _trained(full, train_norms):
            continue
        owner_name, _, attr = full.rpartition(".")
        owner = net.get_submodule(owner_name) if owner_name else net
        value = owner._parameters.pop(attr)
        owner.register_buffer(attr, value.detach().requires_grad_(False))
        frozen.append(full)
    net.frozen_names = frozen


@contextlib.contextmanager
def base_trainable(net: nn.Module) -> Iterator[None]:
    """The frozen base weights as parameters (for pretraining them), buffers again after."""
    names = list(getattr(net, "frozen_names", []))
    for full in names:
        owner_name, _, attr = full.rpartition(".")
        owner = net.get_submodule(owner_name) if owner_name else net
        owner.register_parameter(attr, nn.Parameter(owner._buffers.pop(attr)))
    try:
        yield
    finally:
        for full in names:
            owner_name, _, attr = full.rpartition(".")
            owner = net.get_submodule(owner_name) if owner_name else net
            value = owner._parameters.pop(attr)
            owner.register_buffer(attr, value.detach().requires_grad_(False))


def vit_init_state(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm ViT state dict (fused ``attn.qkv``) in ``net``'s layout: ``qkv`` split into ``q``,
    ``k``, ``v`` (``.base_layer.`` where an adapter sits), the adapters kept from ``net``, and the
    keys ``net`` has no place for (a classifier ``head``, an MAE decoder) left out."""
    own = net.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            prefix, kind = key.rsplit(".", 1)
            d = value.shape[0] // 3
            for i, part in enumerate("qkv"):
                plain = f"{prefix}.{part}.{kind}"
                name = plain if plain in own else f"{prefix}.{part}.base_layer.{kind}"
                out[name] = value[i * d:(i + 1) * d]
            continue
        prefix, _, kind = key.rpartition(".")
        wrapped = f"{prefix}.base_layer.{kind}"
        name = key if key in own else wrapped if wrapped in own else None
        if name is not None:
            out[name] = value
    for key, value in own.items():
        if "lora_" in key:
            out[key] = value
    return out

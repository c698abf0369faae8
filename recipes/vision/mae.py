"""Masked-autoencoder pretext for ViT backbones (``pretext.task=mae``; He et al. 2022).

A batch is ``(images, noise)``: ``noise`` (``B × L`` uniform numbers, ``L`` patches, drawn by the
loader, :class:`MaskedBatches`) fixes the mask, so the loss is a deterministic function of the
parameters and the batch, as the bilevel solver's gradients and curvature products need. Per
image the ``round((1 − mask_ratio)·L)`` patches of smallest noise are kept; the encoder (the ViT,
adapters included) sees only those and the class token; a small transformer decoder
(:class:`MAEDecoder`) fills in mask tokens at every position and predicts each patch's pixels; the
loss is the mean squared error against the per-patch normalised pixels (``(p − mean_p)/std_p``),
averaged over the masked patches only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicitbilevel import functional_module
from recipes.common.bissl_stage import BiSSLLosses

__all__ = ["MAEDecoder", "MAEPretext", "MaskedBatches", "keep_count", "mae_bissl_losses",
           "patchify", "pretrain_mae"]


def keep_count(patches: int, mask_ratio: float) -> int:
    """The visible patches per image (at least one)."""
    return max(1, round((1.0 - mask_ratio) * patches))


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W) → (B, L, patch²·C)`` in the ViT's patch order (row-major)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MAEDecoder(nn.Module):
    """Linear embedding, mask token, learnt positions, ``depth`` timm blocks, pixel head."""

    def __init__(self, enc_dim: int, patches: int, patch_pixels: int, dim: int = 32,
                 depth: int = 1, heads: int = 2) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        for block in self.blocks:
            block.attn.fused_attn = False
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_pixels)

    def forward(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Predicted pixels ``(B, L, patch_pixels)`` from the encoded ``[cls, visible]`` tokens."""
        x = self.embed(latent)
        b, visible, d = x.shape
        patches = restore.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, patches - visible + 1, d)], 1)
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], tokens], 1) + self.pos
        return self.head(self.norm(self.blocks(x)))[:, 1:]


class MAEPretext(nn.Module):
    """The ViT (``backbone``, θ) and the MAE decoder (φ_P); ``forward(images, noise)`` is the
    loss."""

    def __init__(self, backbone: nn.Module, image_size: int, mask_ratio: float = 0.75,
                 decoder_dim: int = 32, decoder_depth: int = 1, decoder_heads: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.patches = (image_size // backbone.patch) ** 2
        self.decoder = MAEDecoder(backbone.out_dim, self.patches, backbone.patch ** 2 * 3,
                                  decoder_dim, decoder_depth, decoder_heads)

    def encode(self, images: Tensor, keep: Tensor) -> Tensor:
        """The encoder on the class token and the patches ``keep`` (``B × visible``)."""
        vit = self.backbone
        x = vit.patch_embed(images) + vit.pos_embed[:, vit.num_prefix_tokens:]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return vit.norm(vit.blocks(torch.cat([cls, x], 1)))

    def masks(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(keep, restore, mask)``: the kept patch indices, the inverse permutation and the
        0/1 mask (1 = masked) of each image."""
        order = torch.argsort(noise, dim=1)
        restore = torch.argsort(order, dim=1)
        visible = keep_count(noise.shape[1], self.mask_ratio)
        mask = torch.ones_like(noise)
        mask[:, :visible] = 0
        return order[:, :visible], restore, torch.gather(mask, 1, restore)

    def forward(self, images: Tensor, noise: Tensor) -> Tensor:
        """The normalised-pixel MSE on the masked patches."""
        keep, restore, mask = self.masks(noise)
        pred = self.decoder(self.encode(images, keep), restore)
        target = patchify(images, self.backbone.patch)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


class MaskedBatches:
    """``(images, noise)`` batches from a loader of view pairs (the first view).

    Each pass draws its noise from a generator seeded by ``seed`` and one number drawn from
    torch's global generator when the pass starts (after the loader's own shuffle): the BiSSL
    trainer, which restores the global generator at the start of a pass on resume, replays the
    same masks, as it replays the same images."""

    def __init__(self, loader: Any, patches: int, seed: int) -> None:
        self.loader, self.patches, self.seed = loader, patches, seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        inner = iter(self.loader)
        drawn = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed((self.seed * 1000003 + drawn) % (2**63 - 1))
        return self._masked(inner, gen)

    def _masked(self, inner: Iterator, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in inner:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield images, torch.rand(images.shape[0], self.patches, generator=gen)


def pretrain_mae(model: MAEPretext, batches: MaskedBatches, *, epochs: int, lr: float,
                 weight_decay: float, device: torch.device, warmup_epochs: int = 0,
                 progress: bool = False) -> list[float]:
    """Train every parameter of ``model`` with AdamW (β₂ = 0.95) and a warm-up + cosine
    schedule; the mean loss of every epoch."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                            weight_decay=weight_decay)
    total, warm = max(1, epochs * len(batches)), warmup_epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    losses = []
    for _ in range(epochs):
        running = []
        for images, noise in batches:
            loss = model(images.to(device), noise.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(float(loss.detach()))
        losses.append(sum(running) / len(running))
        if progress:
            print(f"mae epoch {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    return losses


def mae_bissl_losses(pretext: MAEPretext, downstream: nn.Module) -> BiSSLLosses:
    """The MAE loss as ``L^P``, cross-entropy as ``L^D``; the coupled names are the downstream
    model's ``backbone.*`` parameters (the adapters, the base weights being buffers)."""
    pre_fn, down_fn = functional_module(pretext), functional_module(downstream)

    def pretext_loss(params: dict, batch: Any) -> Tensor:
        images, noise = batch
        return pre_fn(params, images, noise)

    def downstream_loss(params: dict, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(down_fn(params, x).float(), y)

    backbone = [n for n, _ in downstream.named_parameters() if n.startswith("backbone.")]
    return BiSSLLosses(downstream_loss, pretext_loss, None, backbone)

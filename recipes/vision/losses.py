"""The SimCLR objective: NT-Xent (thesis eq. 2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent", "nt_xent_logits", "nt_xent_targets"]


def nt_xent_logits(z1: Tensor, z2: Tensor, tau: float = 0.5) -> Tensor:
    """The ``2N × 2N`` similarity logits ``sim(z_i, z_k)/τ`` of NT-Xent, ``−∞`` on the diagonal.

    NT-Xent is the cross-entropy of these logits against :func:`nt_xent_targets`: the logits are
    the outputs of the Gauss–Newton split of the pretext loss and the cross-entropy its convex part.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {z1.shape}, {z2.shape}")
    if z1.shape[0] < 2:
        raise ValueError("NT-Xent needs at least 2 images (one negative) per batch")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / tau
    return logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -torch.inf)


def nt_xent_targets(logits: Tensor) -> Tensor:
    """The positive of each anchor: view ``i`` of one image is paired with view ``i ± N``."""
    n = logits.shape[0] // 2
    return torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(logits.device)


def nt_xent(z1: Tensor, z2: Tensor, tau: float = 0.5) -> Tensor:
    """NT-Xent over ``2N`` projections (eq. 2.1), averaged over all ``2N`` anchors.

    ``z1[i]`` and ``z2[i]`` are the two views of image ``i``. For anchor ``i`` with positive ``j``,
    ``ℓ_ij = −log( exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) )``, ``sim`` the cosine
    similarity.
    """
    logits = nt_xent_logits(z1, z2, tau)
    return F.cross_entropy(logits, nt_xent_targets(logits))

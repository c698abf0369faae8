"""Unsupervised measures of a representation, for the transfer monitor (thesis Sec. 9.1, last item).

Pure functions of embedding matrices ``Z ∈ R^{n×d}`` (rows are inputs), computed in float64:

- :func:`rankme`: the effective rank of ``Z`` (Garrido et al. 2023), ``exp(−Σ_k p_k log p_k)``
  with ``p_k = σ_k / Σ_j σ_j + ε`` over the singular values ``σ`` of ``Z``.
- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020) of ℓ2-normalised embeddings ``ẑ``:
  ``E ‖ẑ_1 − ẑ_2‖^α`` over pairs of views of one input, and ``log E_{i<j} exp(−t ‖ẑ_i − ẑ_j‖²)``
  over pairs of inputs.
- :func:`gaussian_mutual_information`: an information estimate between the two views' embeddings,
  in the spirit of the thesis's reference [95] (a mutual-information view of representation
  quality); see its docstring for the choice.
- :func:`knn_accuracy`: the one *labelled* reference, a k-nearest-neighbour probe.

None of the unsupervised measures takes labels; :func:`knn_accuracy` is the only function here
that does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "alignment",
    "gaussian_entropy",
    "gaussian_mutual_information",
    "knn_accuracy",
    "rankme",
    "representation_measures",
    "uniformity",
]


def _matrix(z: Tensor, name: str = "z") -> Tensor:
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"{name}: expected an (n, d) embedding matrix with n >= 2, got "
                         f"{tuple(z.shape)}")
    return z.detach().to(torch.float64)


def _normalise(z: Tensor) -> Tensor:
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe, the smooth effective rank of ``Z`` (Garrido et al. 2023, eq. 1).

    ``RankMe(Z) = exp(−Σ_k p_k log p_k)``, ``p_k = σ_k(Z)/‖σ(Z)‖_1 + ε``. It lies in
    ``[1, min(n, d)]`` (for ``ε = 0``) and equals ``r`` when ``Z`` has ``r`` equal non-zero singular
    values; a collapsing representation drives it towards 1.
    """
    sigma = torch.linalg.svdvals(_matrix(z))
    p = sigma / sigma.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """``E_i ‖ẑ1_i − ẑ2_i‖^α`` over the rows (Wang & Isola 2020, ``L_align``; lower is better):
    how close the normalised embeddings of two views of one input are."""
    a, b = _matrix(z1, "z1"), _matrix(z2, "z2")
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must have one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    return float((_normalise(a) - _normalise(b)).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """``log E_{i<j} exp(−t ‖ẑ_i − ẑ_j‖²)`` (Wang & Isola 2020, ``L_uniform``; lower is better):
    how evenly the normalised embeddings cover the sphere. Its minimum over ``n → ∞`` points on
    ``S^{d−1}`` is reached by the uniform distribution; two antipodal points give ``−4t``."""
    zn = _normalise(_matrix(z))
    sq = torch.pdist(zn).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def gaussian_entropy(z: Tensor, ridge: float = 1e-4) -> float:
    """Differential entropy (nats) of a Gaussian with the sample covariance of ``Z``:
    ``½ log det(2πe (Σ + ρ I))``, ``ρ = ridge · tr(Σ)/d`` (the ridge keeps a rank-deficient
    ``Σ``, ``n ≤ d``, finite; it is relative, so the estimate follows ``Z``'s scale)."""
    x = _matrix(z)
    x = x - x.mean(dim=0)
    cov = x.T @ x / (x.shape[0] - 1)
    d = cov.shape[0]
    cov = cov + ridge * float(torch.trace(cov)) / d * torch.eye(d, dtype=cov.dtype)
    return 0.5 * (d * math.log(2 * math.pi * math.e) + float(torch.linalg.slogdet(cov)[1]))


def gaussian_mutual_information(z1: Tensor, z2: Tensor, ridge: float = 1e-4) -> float:
    """``I(Z1; Z2) ≈ H(Z1) + H(Z2) − H(Z1, Z2)`` under a joint Gaussian fit (nats).

    ``= ½ [log det Σ_11 + log det Σ_22 − log det Σ]`` with ``Σ`` the sample covariance of the
    concatenated views ``[Z1, Z2]`` (each block ridged as in :func:`gaussian_entropy`). For jointly
    Gaussian views with per-coordinate correlations ``ρ_k`` it is ``−½ Σ_k log(1 − ρ_k²)``.

    Why this estimate: the thesis's reference [95] judges self-supervised representations by
    mutual information; without labels the information the representation keeps about the input
    can be read off the two augmented views (the InfoMax reading of two-view self-supervised
    learning): high when the views' embeddings are predictable from each other *and* spread over
    many directions, near 0 for a collapsed or view-noise-dominated representation. The Gaussian
    closed form needs no trained critic (unlike MINE/InfoNCE bounds), is deterministic given the
    embeddings and costs one ``2d × 2d`` log-determinant. It is exact for jointly Gaussian
    embeddings and otherwise a second-order summary (not a bound on the true mutual information),
    invariant to invertible linear maps of each view (up to the ridge). It needs clearly more
    rows than ``2d``: below that ``Σ`` is singular and the ridge sets the value.
    """
    a, b = _matrix(z1, "z1"), _matrix(z2, "z2")
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must have one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    joint = torch.cat([a, b], dim=1)
    d = a.shape[1]
    x = joint - joint.mean(dim=0)
    cov = x.T @ x / (x.shape[0] - 1)
    scale = torch.cat([torch.full((d,), float(torch.trace(cov[:d, :d])) / d),
                       torch.full((d,), float(torch.trace(cov[d:, d:])) / d)]).to(cov)
    cov = cov + ridge * torch.diag(scale)

    def logdet(m: Tensor) -> float:
        return float(torch.linalg.slogdet(m)[1])

    return 0.5 * (logdet(cov[:d, :d]) + logdet(cov[d:, d:]) - logdet(cov))


def knn_accuracy(
    memory: Tensor,
    memory_labels: Tensor,
    query: Tensor | None = None,
    query_labels: Tensor | None = None,
    k: int = 10,
) -> float:
    """Accuracy of a k-nearest-neighbour classifier by cosine similarity (majority vote).

    Each query takes the labels of its ``k`` most cosine-similar rows of ``memory``; the most
    frequent label wins, ties to the smallest label (as scikit-learn's ``KNeighborsClassifier``).
    ``query=None`` scores ``memory`` against itself leave-one-out (a row is never its own
    neighbour), the probe of the transfer monitor on the validation split.
    """
    mem = _normalise(_matrix(memory, "memory"))
    y = memory_labels.reshape(-1).long().cpu()
    loo = query is None
    q = mem if loo else _normalise(_matrix(query, "query"))
    qy = y if loo else query_labels.reshape(-1).long().cpu()  # type: ignore[union-attr]
    available = mem.shape[0] - int(loo)
    if not 1 <= k <= available:
        raise ValueError(f"k (bissl.monitor_knn_k) must be in [1, {available}], got {k}")
    sim = q @ mem.T
    if loo:
        sim.fill_diagonal_(-math.inf)
    idx = sim.topk(k, dim=1).indices.cpu()
    votes = torch.zeros(q.shape[0], int(y.max()) + 1, dtype=torch.long)
    votes.scatter_add_(1, y[idx], torch.ones_like(idx))
    return float((votes.argmax(dim=1) == qy).double().mean())


def representation_measures(z1: Tensor, z2: Tensor) -> dict[str, float]:
    """The monitor's unsupervised measures of two views' embeddings (rows paired by input):
    ``rankme`` of both views stacked, ``alignment``, ``uniformity`` (mean of the two views) and
    ``gaussian_mi`` (nats)."""
    return {
        "rankme": rankme(torch.cat([z1, z2])),
        "alignment": alignment(z1, z2),
        "uniformity": 0.5 * (uniformity(z1) + uniformity(z2)),
        "gaussian_mi": gaussian_mutual_information(z1, z2),
    }

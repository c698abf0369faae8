"""The transfer monitor during BiSSL (thesis Sec. 9.1, last item): measures, callback, verdict.

Every ``bissl.monitor_every`` alternations (and after the last) :func:`transfer_monitor`, a
trainer callback, embeds *unlabelled* pairs of views of downstream inputs with the current
lower-level backbone θ_P and logs into that alternation's record of ``metrics.jsonl`` pure
functions of the embedding matrices ``Z ∈ R^{n×d}`` (rows are inputs, computed in float64):

- :func:`rankme`: the effective rank of ``Z`` (Garrido et al. 2023), ``exp(−Σ_k p_k log p_k)``
  with ``p_k = σ_k / Σ_j σ_j + ε`` over the singular values ``σ`` of ``Z``.
- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020) of ℓ2-normalised embeddings ``ẑ``:
  ``E ‖ẑ_1 − ẑ_2‖^α`` over pairs of views of one input, and ``log E_{i<j} exp(−t ‖ẑ_i − ẑ_j‖²)``
  over pairs of inputs.
- :func:`gaussian_mutual_information` (``gaussian_mi``): an information estimate between the two
  views' embeddings, in the spirit of the thesis's reference [95] (a mutual-information view of
  representation quality); see its docstring for the choice.
- :func:`knn_accuracy` (``knn_accuracy``): the one *labelled* reference, a leave-one-out
  k-nearest-neighbour probe (scikit-learn) on the validation split; plus ``monitor_seconds``.

None of the unsupervised measures takes labels. The recipe supplies a :class:`MonitorData`: the
views (inputs only), the embedding function and, separately, the labelled probe batches. The
views are drawn under a fixed seed inside a forked random state, so every monitored alternation
sees the same views and the trainer's random stream (hence a resumed run) is unchanged.

Does the monitor track transfer? After ``sweep --param lam --set bissl.monitor_every=K``,
:func:`monitor_correlations` computes for each unsupervised measure Spearman's ρ
(``scipy.stats.spearmanr``) with ``knn (final)`` (the probe at the last monitored alternation,
one point per sweep value: the θ_P that BiSSL+FT starts from), ``knn (all)`` (every monitored
alternation of every value) and ``BiSSL+FT test`` (the value's BiSSL+FT test metric)::

    python -m recipes.common.transfer_monitor runs/vision --param lam [--target digits]

Alignment and uniformity are "lower is better", so a useful alignment/uniformity has ρ < 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .report import MONITOR_CURVES as MEASURES
from .report import write_json

__all__ = [
    "MEASURES",
    "MonitorData",
    "alignment",
    "embed_all",
    "format_correlations",
    "gaussian_entropy",
    "gaussian_mutual_information",
    "knn_accuracy",
    "main",
    "monitor_correlations",
    "rankme",
    "representation_measures",
    "spearman",
    "transfer_monitor",
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
    """Accuracy of scikit-learn's k-nearest-neighbour classifier by cosine distance.

    Each query takes the majority label of its ``k`` most cosine-similar rows of ``memory``, ties
    to the smallest label. ``query=None`` scores ``memory`` against itself leave-one-out (a row
    is never its own neighbour), the probe of the transfer monitor on the validation split.
    """
    from sklearn.neighbors import KNeighborsClassifier

    mem = _matrix(memory, "memory").cpu().numpy()
    y = memory_labels.reshape(-1).long().cpu().numpy()
    available = mem.shape[0] - int(query is None)
    if not 1 <= k <= available:
        raise ValueError(f"k (bissl.monitor_knn_k) must be in [1, {available}], got {k}")
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(mem, y)
    if query is None:
        return float((clf.predict(None) == y).mean())
    qy = query_labels.reshape(-1).long().cpu().numpy()  # type: ignore[union-attr]
    return float(clf.score(_matrix(query, "query").cpu().numpy(), qy))


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


# -- the trainer callback ------------------------------------------------------------------------


@dataclass
class MonitorData:
    """What a recipe hands the transfer monitor.

    Attributes:
        views: re-iterable batches ``(view1, view2)`` of *unlabelled* downstream inputs (two
            augmentations of the same inputs, paired by row).
        embed: ``embed(inputs) -> (B, d)``: θ_P's representation of a batch of inputs (the live
            pretext backbone, so it follows the lower level).
        modules: put in eval mode while embedding (then restored).
        probe: re-iterable labelled validation batches ``(inputs, labels)`` for the k-NN probe,
            or ``None``.
        limit: at most this many inputs are embedded (``bissl.monitor_samples``).
    """

    views: Iterable[tuple[Any, Any]]
    embed: Callable[[Any], Tensor]
    modules: Sequence[nn.Module] = ()
    probe: Iterable[tuple[Any, Tensor]] | None = None
    limit: int = 512


def _identity(x: Tensor) -> Tensor:
    return x


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    modes = [[m.training for m in mod.modules()] for mod in modules]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for mod, flags in zip(modules, modes, strict=True):
            for m, flag in zip(mod.modules(), flags, strict=True):
                m.training = flag


def embed_all(batches: Iterable[Sequence[Any]], fns: Sequence[Callable[[Any], Tensor]],
              limit: int) -> list[Tensor]:
    """Apply ``fns[i]`` to the ``i``-th element of every batch, over the first ``limit`` rows
    of ``batches``; returns the results stacked on the CPU (one tensor per element)."""
    out: list[list[Tensor]] = [[] for _ in fns]
    seen = 0
    for batch in batches:
        for i, fn in enumerate(fns):
            out[i].append(fn(batch[i]).detach().cpu())
        seen += len(out[0][-1])
        if seen >= limit:
            break
    return [torch.cat(chunks)[:limit] for chunks in out]


def transfer_monitor(data: MonitorData, every: int, knn_k: int = 10, seed: int = 0,
                     ) -> Callable[[Any, int, dict[str, Any]], Mapping[str, float] | None]:
    """A :class:`~implicitbilevel.bissl.BiSSLTrainer` callback logging the monitor every
    ``every`` alternations (``t % every == 0``) and after the last; ``knn_k = 0`` or
    ``data.probe = None`` leaves out the k-NN probe."""
    if every < 1:
        raise ValueError(f"bissl.monitor_every must be >= 1 to monitor, got {every}")

    def callback(trainer: Any, t: int, record: dict[str, Any]) -> Mapping[str, float] | None:
        if t % every and t != trainer.config.alternations - 1:
            return None
        start = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _eval_mode(data.modules):
            torch.manual_seed(seed)
            z1, z2 = embed_all(data.views, (data.embed, data.embed), data.limit)
            out = representation_measures(z1, z2)
            if knn_k and data.probe is not None:
                z, labels = embed_all(data.probe, (data.embed, _identity), data.limit)
                out["knn_accuracy"] = knn_accuracy(z, labels, k=knn_k)
        out["monitor_seconds"] = time.perf_counter() - start
        return out

    return callback


# -- does it track transfer? --------------------------------------------------------------------


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of finite pairs (``nan`` with fewer than 3 or a constant)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def monitor_correlations(out_dir: str | Path, param: str = "lam",
                         target: str | None = None) -> dict[str, Any]:
    """The correlations for the sweep in ``out_dir/sweep_<param>/`` (see the module docstring);
    ``target`` defaults to the only one present."""
    root = Path(out_dir) / f"sweep_{param}"
    values = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: float(p.name))
    if not values:
        raise FileNotFoundError(f"{root}: no sweep values; run `sweep --param {param}` first")
    if target is None:
        found = sorted({h.parent.name for v in values for h in v.glob("*/bissl_history.json")})
        if len(found) != 1:
            raise ValueError(f"pass --target, one of {found}")
        target = found[0]
    final: dict[str, list[float]] = {m: [] for m in (*MEASURES, "knn_accuracy", "test")}
    pooled: dict[str, list[float]] = {m: [] for m in (*MEASURES, "knn_accuracy")}
    for v in values:
        history = json.loads((v / target / "bissl_history.json").read_text())
        rows = [h for h in history if "rankme" in h]
        if not rows:
            raise ValueError(f"{v / target}: no monitor records (set bissl.monitor_every)")
        for m in pooled:
            pooled[m] += [r.get(m) for r in rows]
            final[m].append(rows[-1].get(m))
        ft = v / target / "bissl_ft.json"
        test = math.nan
        if ft.exists():
            summary = json.loads(ft.read_text())["summary"]
            test = next(s["mean"] for k, s in summary.items() if k.startswith("test_"))
        final["test"].append(test)
    table = {m: {"knn (final)": spearman(final[m], final["knn_accuracy"]),
                 "knn (all)": spearman(pooled[m], pooled["knn_accuracy"]),
                 "BiSSL+FT test": spearman(final[m], final["test"])} for m in MEASURES}
    return {"param": param, "target": target, "values": [v.name for v in values],
            "final": final, "spearman": table}


def format_correlations(result: dict[str, Any]) -> str:
    """A plain table: one row per measure, one column per reference."""
    cols = ["knn (final)", "knn (all)", "BiSSL+FT test"]
    lines = [f"{'measure':<12}" + "".join(f"{c:>15}" for c in cols)]
    for m, row in result["spearman"].items():
        lines.append(f"{m:<12}" + "".join(f"{row[c]:>15.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: print the table, write ``monitor_correlation_<param>.json``."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the run.out_dir the sweep ran in")
    p.add_argument("--param", default="lam", help="the swept parameter (sweep --param)")
    p.add_argument("--target", default=None, help="the downstream target (default: the only one)")
    args = p.parse_args(argv)
    result = monitor_correlations(args.out_dir, args.param, args.target)
    print(f"Spearman ρ over {args.param} = {', '.join(result['values'])} ({result['target']}):")
    print(format_correlations(result))
    write_json(result, Path(args.out_dir) / f"monitor_correlation_{args.param}.json")
    return result


if __name__ == "__main__":
    main()

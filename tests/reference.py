"""Independent references shared by the tests: parameter dicts flattened and back, dense Hessians
by ``torch.autograd.functional``, block-split linear systems given as ``matvec`` over parameter
dicts, and relative errors. One copy here instead of one per test module."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    """The entries of ``tree``, detached and concatenated."""
    return torch.cat([t.detach().reshape(-1) for t in tree.values()])


def unflat(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vec`` cut into a dict shaped like ``like``."""
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = vec[offset:offset + ref.numel()].reshape(ref.shape)
        offset += ref.numel()
    assert offset == vec.numel()
    return out


def dense_hessian(fn, params: dict[str, torch.Tensor], *args) -> torch.Tensor:
    """The full Hessian of ``fn(params, *args)`` over the flattened ``params`` (autograd)."""
    like = {n: p.detach() for n, p in params.items()}
    return torch.autograd.functional.hessian(
        lambda v: fn(unflat(v, like), *args), flat(like), vectorize=True
    )


def rel_err(x, ref) -> float:
    """``‖x − ref‖ / ‖ref‖`` for tensors or numpy arrays (a zero ``ref`` counts as 1e-300)."""
    if isinstance(x, np.ndarray):
        return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def split_shapes(n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Split ``n`` unknowns into 2-3 tensors of different shapes (a 1-unknown problem: 1 tensor)."""
    if n == 1:
        return [(1,)]
    parts = 2 if n < 3 else int(rng.integers(2, 4))
    cuts = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [n]])).tolist()
    shapes: list[tuple[int, ...]] = [(sizes[0],)]
    for i, size in enumerate(sizes[1:], start=1):
        if i == 1:
            shapes.append((2, size // 2) if size % 2 == 0 else (size, 1))
        else:
            shapes.append((1, size, 1))
    return shapes


def to_tree_t(vec: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    """A flat tensor as the dict ``{"block<i>": ...}`` of ``shapes``."""
    out, offset = {}, 0
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        out[f"block{i}"] = vec[offset:offset + size].reshape(shape)
        offset += size
    return out


def to_tree(vec: np.ndarray, shapes, dtype=F64) -> dict[str, torch.Tensor]:
    """A numpy vector as the dict ``{"block<i>": ...}`` of ``shapes`` in ``dtype``."""
    return to_tree_t(torch.tensor(vec, dtype=dtype), shapes)


def to_flat(tree: dict[str, torch.Tensor]) -> np.ndarray:
    """A dict of tensors as one float64 numpy vector."""
    return np.concatenate([t.detach().numpy().astype(np.float64).ravel() for t in tree.values()])


def make_matvec(a: np.ndarray, shapes, dtype=F64, counter: list | None = None):
    """``v ↦ A v`` over block dicts for a dense ``A``; each product appends to ``counter``."""
    a_t = torch.tensor(a, dtype=dtype)

    def matvec(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if counter is not None:
            counter.append(1)
        return to_tree_t(a_t @ torch.cat([v[f"block{i}"].reshape(-1)
                                          for i in range(len(shapes))]), shapes)

    return matvec

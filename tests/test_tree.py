"""Tests of :mod:`implicitbilevel.tree`, the arithmetic on parameter dicts.

Every helper is checked against the same computation done independently on one flat float64
numpy vector built by concatenating the dict's tensors in key order:

- ``tree_zeros_like`` / ``tree_clone``: names, shapes, dtypes, values; clones are detached copies
  that do not alias the input.
- ``tree_add`` / ``tree_sub`` / ``tree_scale`` / ``tree_axpy``: element-wise results, with the
  operands given in different key orders (they are matched by name), Python-number and
  0-dim-tensor scalars; ``tree_axpy(alpha, x, y)`` returns the names of ``x`` (``y`` may hold more).
- ``tree_block_dots`` / ``tree_dot`` / ``tree_norm``: per-block dots, the global dot, the norm.
- ``tree_select``: the sub-dict holds the same tensor objects (no copies).
- ``tree_flatten`` / ``tree_unflatten``: concatenation order, round trip, and the ``ValueError``
  for a flat vector of the wrong length.

Shapes (0-d to 3-d), the number of tensors and the dtype (float32, float64) are drawn by
hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicitbilevel.tree import (
    tree_add,
    tree_axpy,
    tree_block_dots,
    tree_clone,
    tree_dot,
    tree_flatten,
    tree_norm,
    tree_scale,
    tree_select,
    tree_sub,
    tree_unflatten,
    tree_zeros_like,
)

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def trees(draw, n_trees: int = 1):
    """Draw ``n_trees`` dicts with the same names/shapes/dtype and independent random values."""
    n = draw(st.integers(1, 4))
    tensor_shapes = [draw(shapes) for _ in range(n)]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    names = [f"layer{i}.w" for i in range(n)]
    out = []
    for _ in range(n_trees):
        out.append(
            {
                name: torch.randn(s, generator=gen, dtype=dtype)
                for name, s in zip(names, tensor_shapes)
            }
        )
    return out


def flat_np(tree: dict[str, torch.Tensor], keys=None) -> np.ndarray:
    """Independent flattening: numpy concatenation in the given (default: dict) key order."""
    keys = list(tree.keys()) if keys is None else keys
    return np.concatenate([tree[k].detach().numpy().astype(np.float64).ravel() for k in keys])


def assert_tree_close(result: dict, expected_flat: np.ndarray, like: dict, dtype) -> None:
    assert list(result.keys()) == list(like.keys())
    for name in like:
        assert result[name].shape == like[name].shape
        assert result[name].dtype == dtype
    np.testing.assert_allclose(flat_np(result), expected_flat, rtol=RTOL[dtype], atol=RTOL[dtype])


def reversed_order(tree: dict) -> dict:
    return {k: tree[k] for k in reversed(list(tree.keys()))}


@SETTINGS
@given(trees(1))
def test_zeros_like(ts):
    (a,) = ts
    z = tree_zeros_like(a)
    dtype = next(iter(a.values())).dtype
    assert_tree_close(z, np.zeros(sum(t.numel() for t in a.values())), a, dtype)


@SETTINGS
@given(trees(1))
def test_clone_is_detached_copy(ts):
    (a,) = ts
    a = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    expected = flat_np(a)
    c = tree_clone(a)
    dtype = next(iter(a.values())).dtype
    assert_tree_close(c, expected, a, dtype)
    for name in a:
        assert not c[name].requires_grad
        assert c[name].data_ptr() != a[name].data_ptr()
    # Mutating the clone leaves the original unchanged.
    for v in c.values():
        v.add_(1.0)
    np.testing.assert_array_equal(flat_np(a), expected)


@SETTINGS
@given(trees(2))
def test_add_sub(ts):
    a, b = ts
    dtype = next(iter(a.values())).dtype
    # b given in the opposite key order: the result must match by name, in a's order.
    b_rev = reversed_order(b)
    assert_tree_close(tree_add(a, b_rev), flat_np(a) + flat_np(b), a, dtype)
    assert_tree_close(tree_sub(a, b_rev), flat_np(a) - flat_np(b), a, dtype)


@SETTINGS
@given(trees(1), st.floats(-5, 5, allow_nan=False, allow_subnormal=False), st.booleans())
def test_scale(ts, scale, as_tensor):
    (a,) = ts
    dtype = next(iter(a.values())).dtype
    s = torch.tensor(scale, dtype=dtype) if as_tensor else scale
    result = tree_scale(a, s)
    tol = RTOL[dtype] * (1 + abs(scale))
    assert list(result.keys()) == list(a.keys())
    assert all(result[k].dtype == dtype and result[k].shape == a[k].shape for k in a)
    np.testing.assert_allclose(flat_np(result), scale * flat_np(a), rtol=tol, atol=tol)


@SETTINGS
@given(trees(2), st.floats(-5, 5, allow_nan=False, allow_subnormal=False), st.booleans())
def test_axpy(ts, alpha, as_tensor):
    x, y = ts
    dtype = next(iter(x.values())).dtype
    al = torch.tensor(alpha, dtype=dtype) if as_tensor else alpha
    # x in the opposite key order; the result has x's names in x's order and is matched by name.
    x_rev = reversed_order(x)
    # y may hold more names than x: the extra ones are ignored.
    y_extra = dict(y, extra=torch.full((3,), 7.0, dtype=dtype))
    result = tree_axpy(al, x_rev, y_extra)
    keys = list(x_rev.keys())
    assert list(result.keys()) == keys
    assert all(result[k].shape == x[k].shape and result[k].dtype == dtype for k in keys)
    expected = flat_np(y, keys) + np.float64(alpha) * flat_np(x, keys)
    tol = RTOL[dtype] * (1 + abs(alpha))
    np.testing.assert_allclose(flat_np(result, keys), expected, rtol=tol, atol=tol)


@SETTINGS
@given(trees(2))
def test_block_dots_dot_norm(ts):
    a, b = ts
    dtype = next(iter(a.values())).dtype
    keys = list(a.keys())
    expected_blocks = np.array(
        [
            float(np.dot(a[k].numpy().astype(np.float64).ravel(),
                         b[k].numpy().astype(np.float64).ravel()))
            for k in keys
        ]
    )
    blocks = tree_block_dots(a, reversed_order(b))
    assert blocks.shape == (len(keys),)
    assert blocks.dtype == dtype
    scale = float(np.linalg.norm(flat_np(a)) * np.linalg.norm(flat_np(b))) + 1e-30
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(blocks.numpy(), expected_blocks, rtol=tol, atol=tol * scale)

    dot = tree_dot(a, b)
    assert dot.ndim == 0
    np.testing.assert_allclose(
        float(dot), float(np.dot(flat_np(a), flat_np(b))), rtol=tol, atol=tol * scale
    )

    norm = tree_norm(a)
    assert norm.ndim == 0
    np.testing.assert_allclose(float(norm), float(np.linalg.norm(flat_np(a))), rtol=tol)


@SETTINGS
@given(trees(1), st.data())
def test_select(ts, data):
    (a,) = ts
    keys = list(a.keys())
    chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    sub = tree_select(a, chosen)
    assert list(sub.keys()) == chosen
    for k in chosen:
        assert sub[k] is a[k]


def test_select_missing_name_raises():
    with pytest.raises(KeyError):
        tree_select({"a": torch.zeros(2)}, ["b"])


@SETTINGS
@given(trees(1))
def test_flatten_unflatten(ts):
    (a,) = ts
    dtype = next(iter(a.values())).dtype
    flat = tree_flatten(a)
    assert flat.ndim == 1
    assert flat.dtype == dtype
    np.testing.assert_array_equal(flat.numpy().astype(np.float64), flat_np(a))

    # Unflatten an independent vector and compare every block with a manual numpy split.
    n = flat.numel()
    v = torch.arange(n, dtype=dtype) * 0.5 - 3.0
    back = tree_unflatten(v, a)
    assert list(back.keys()) == list(a.keys())
    offset = 0
    vn = v.numpy()
    for k, ref in a.items():
        size = int(np.prod(ref.shape, dtype=np.int64))
        expected = vn[offset:offset + size].reshape(tuple(ref.shape))
        assert back[k].shape == ref.shape
        np.testing.assert_array_equal(back[k].numpy(), expected)
        offset += size
    assert offset == n

    # Round trip.
    rt = tree_unflatten(tree_flatten(a), a)
    for k in a:
        torch.testing.assert_close(rt[k], a[k], rtol=0, atol=0)


@SETTINGS
@given(trees(1), st.integers(1, 5), st.booleans())
def test_unflatten_wrong_length_raises(ts, delta, longer):
    (a,) = ts
    n = sum(t.numel() for t in a.values())
    m = n + delta if longer else max(n - delta, 0)
    if m == n:
        m = n + 1
    with pytest.raises(ValueError, match=str(n)):
        tree_unflatten(torch.zeros(m), a)

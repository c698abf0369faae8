"""Tests of block-wise M-FAC (:class:`implicitbilevel.MFAC` with ``blocks=``) in float64.

- For several partitions (by layer, by a regular expression, explicit lists, one name per block)
  the solve equals the dense block-diagonal formula: ``F̂_b = G_bᵀG_b/k`` computed densely per
  block and ``(D_b + F̂_b/μ) u_b = v_b`` solved by ``torch.linalg.solve``, with windows fewer than,
  equal to and slid past ``m`` and a head ridge ``D``.
- One block (the default, ``"global"``, or every name listed) is the global M-FAC bit for bit.
- A checkpoint restores the block windows exactly (the resumed solver continues bit-identical);
  a checkpoint of another partition is refused; ``window_device="cpu"`` keeps the window there.
"""

from __future__ import annotations

import pytest
import torch

from implicitbilevel import MFAC
from implicitbilevel.implicit_jacobian import IJSystem
from implicitbilevel.solvers.mfac import partition_blocks
from implicitbilevel.tree import tree_flatten, tree_unflatten

D64 = torch.float64
SHAPES = {"enc.0.weight": (3, 2), "enc.0.bias": (3,), "enc.1.weight": (2, 3),
          "enc.1.bias": (2,), "head.weight": (2, 2)}  # 21 unknowns
NAMES = list(SHAPES)
N = sum(torch.Size(s).numel() for s in SHAPES.values())
LIKE = {n: torch.zeros(s, dtype=D64) for n, s in SHAPES.items()}


class ZeroCurvature:
    """The curvature protocol with ``H = 0`` (M-FAC takes no products)."""

    def __init__(self):
        self.params = dict(LIKE)
        self.names = NAMES
        self.memo: dict = {}

    def __call__(self, t):
        return {n: torch.zeros_like(t[n]) for n in self.names}


def system(mu: float, ridge: float = 0.0) -> IJSystem:
    """``A = D + 0/μ``; with ``ridge`` "head.weight" is a head block with ``D = ridge``."""
    identity = NAMES[:-1] if ridge else NAMES
    return IJSystem(ZeroCurvature(), mu, identity=identity, ridge=ridge,
                    ridge_names=["head.weight"] if ridge else ())


def gradients(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [tree_unflatten(torch.randn(N, generator=g, dtype=D64) * (1 + i % 3), LIKE)
            for i in range(count)]


def dense_block_solution(grads, v, mu, blocks, ridge=0.0):
    """``u_b = (D_b + G_bᵀG_b/(kμ))⁻¹ v_b`` per block, each a dense ``torch.linalg.solve``."""
    u = {}
    for block in blocks:
        like = {n: LIKE[n] for n in block}
        d = torch.cat([torch.full((LIKE[n].numel(),), ridge if ridge and n == "head.weight"
                                  else 1.0, dtype=D64) for n in block])
        a = torch.diag(d)
        if grads:
            g = torch.stack([tree_flatten({n: x[n] for n in block}) for x in grads])
            a = a + g.T @ g / (len(grads) * mu)
        u.update(tree_unflatten(torch.linalg.solve(a, tree_flatten({n: v[n] for n in block})),
                                like))
    return u


PARTITIONS = {
    "layer": [["enc.0.weight", "enc.0.bias"], ["enc.1.weight", "enc.1.bias"], ["head.weight"]],
    r"enc\.\d+": [["enc.0.weight", "enc.0.bias"], ["enc.1.weight", "enc.1.bias"],
                  ["head.weight"]],
    "head": [["enc.0.weight", "enc.0.bias", "enc.1.weight", "enc.1.bias"], ["head.weight"]],
    "weight$": [["enc.0.weight", "enc.1.weight", "head.weight"], ["enc.0.bias", "enc.1.bias"]],
}
EXPLICIT = [["enc.1.bias", "enc.0.weight"], ["head.weight"]]  # the rest: one more block


def test_partitions_are_resolved_as_documented():
    for spec, expected in PARTITIONS.items():
        assert partition_blocks(NAMES, spec) == expected
    assert partition_blocks(NAMES, EXPLICIT) == [["enc.0.weight", "enc.1.bias"],
                                                 ["enc.0.bias", "enc.1.weight"], ["head.weight"]]
    assert partition_blocks(NAMES, None) == [NAMES] == partition_blocks(NAMES, "global")
    with pytest.raises(ValueError, match="twice"):
        MFAC(blocks=[["enc.0.bias"], ["enc.0.bias"]])
    with pytest.raises(ValueError, match="regular expression"):
        MFAC(blocks="enc(")
    with pytest.raises(ValueError, match="not solved"):
        partition_blocks(NAMES, [["nope"]])


@pytest.mark.parametrize("spec", [*PARTITIONS, "explicit", "singletons"])
@pytest.mark.parametrize("m,count", [(4, 2), (4, 4), (3, 8)])
@pytest.mark.parametrize("mu,ridge", [(0.05, 0.0), (3.0, 0.0), (0.5, 0.2)])
def test_block_solve_matches_dense_block_diagonal_formula(spec, m, count, mu, ridge):
    blocks = {"explicit": EXPLICIT, "singletons": [[n] for n in NAMES]}.get(spec, spec)
    solver = MFAC(m=m, blocks=blocks)
    grads = gradients(count, seed=count + m)
    for g in grads:
        solver.observe(g)
    v = gradients(1, seed=99)[0]
    u, info = solver(system(mu, ridge), v)
    expected = dense_block_solution(grads[-m:], v, mu, partition_blocks(NAMES, blocks), ridge)
    err = (tree_flatten(u) - tree_flatten({n: expected[n] for n in u})).norm()
    assert float(err / tree_flatten(expected).norm()) < 1e-11
    assert info.iterations == 0


def test_block_solution_differs_from_global_when_blocks_interact():
    grads, v = gradients(5, seed=3), gradients(1, seed=4)[0]
    solvers = [MFAC(m=5), MFAC(m=5, blocks="layer")]
    for s in solvers:
        for g in grads:
            s.observe(g)
    glob, block = (s(system(0.1), v)[0] for s in solvers)
    assert float((tree_flatten(glob) - tree_flatten(block)).norm()) > 1e-3


@pytest.mark.parametrize("blocks", ["global", [NAMES], [list(reversed(NAMES))], r"^"])
def test_one_block_is_the_global_mfac_bit_for_bit(blocks):
    grads, v = gradients(9, seed=5), gradients(1, seed=6)[0]
    ref, one = MFAC(m=4), MFAC(m=4, blocks=blocks)
    for g in grads:
        ref.observe(g)
        one.observe(g)
        for mu, ridge in [(0.3, 0.0), (2.0, 0.5)]:
            a, b = ref(system(mu, ridge), v)[0], one(system(mu, ridge), v)[0]
            assert all(torch.equal(a[n], b[n]) for n in NAMES)


def test_resume_restores_the_block_windows_exactly():
    grads, v = gradients(11, seed=7), gradients(1, seed=8)[0]
    first = MFAC(m=4, blocks="layer")
    for g in grads[:6]:
        first.observe(g)
    first(system(0.2), v)  # a cached factorisation must not survive the resume
    state = first.state_dict()
    assert state["mfac_blocks"] == PARTITIONS["layer"]
    resumed = MFAC(m=4, blocks="layer")
    resumed.load_state_dict(state)
    for g in grads[6:]:
        first.observe(g)
        resumed.observe(g)
        a, b = first(system(0.2), v)[0], resumed(system(0.2), v)[0]
        assert all(torch.equal(a[n], b[n]) for n in NAMES)
    for n in NAMES:
        assert torch.equal(first.window.gram[n], resumed.window.gram[n])
    with pytest.raises(ValueError, match="blocks"):
        MFAC(m=4, blocks="head").load_state_dict(state)
    legacy = MFAC(m=4, blocks="layer")  # a checkpoint from before blocks: the window only
    legacy.load_state_dict({"mfac_window": state["mfac_window"]})
    assert legacy.partition() == PARTITIONS["layer"]


def test_window_device_cpu_keeps_the_window_in_host_memory():
    solver = MFAC(m=3, blocks="layer", window_device="cpu")
    for g in gradients(4, seed=1):
        solver.observe(g)
    assert all(t.device.type == "cpu" for t in solver.window.buffer.values())
    assert all(t.device.type == "cpu" for t in solver.window.gram.values())
    v = gradients(1, seed=2)[0]
    u, _ = solver(system(0.5), v)
    expected = dense_block_solution(gradients(4, seed=1)[-3:], v, 0.5, PARTITIONS["layer"])
    assert all(torch.allclose(u[n], expected[n], rtol=1e-11, atol=1e-13) for n in NAMES)

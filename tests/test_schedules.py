"""Tests of :mod:`implicitbilevel.lam` against thesis Sec. 5.2.1 and Definition 5.1.

- ``ConstantSchedule``: the same value at every t; non-positive / non-finite values rejected.
- ``CosineDecay``, ``CosineIncrease``, ``ExponentialIncrease``: ``λ(t) = (λ_max − λ_min) f(t) +
  λ_min`` with ``f_CD(0) = 1, f_CD(T−1) = 0`` and ``f_CI = f_EI = 0`` at ``t = 0``, ``1`` at
  ``t = T−1``; monotone over every ``t`` (hypothesis over ``λ_min < λ_max``, ``T ∈ 2..1000``,
  ``α``); the value at a mid point against the closed forms written out here; ``t`` outside
  ``0..T−1`` raises; ``λ ≤ 0``, ``λ_max < λ_min``, ``T < 2`` and ``α ≤ 0`` raise ``ValueError``.
- ``LearnableLambda(init)``: ``softplus(ρ) == init``, ``derivative() == sigmoid(ρ)`` and equals the
  autograd derivative of softplus at ρ; ``gradient_scale`` is ``σ'(ρ)/(σ(ρ) + λ_damp^ρ)`` with its
  own damping (an explicit 0 included) or the problem's when ``damping=None``.
- ``as_lambda`` passes schedules through, wraps positive floats, and rejects 0, negatives, NaN,
  infinity, booleans and strings.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from implicitbilevel.lam import (
    ConstantSchedule,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    LearnableLambda,
    as_lambda,
)

SETTINGS = settings(max_examples=25, deadline=None)


def f_cd(t: int, T: int) -> float:
    """Thesis Sec. 5.2.1: f_CD(t) = 1/2 (1 + cos(pi t / (T - 1)))."""
    return 0.5 * (1.0 + math.cos(math.pi * t / (T - 1)))


def f_ci(t: int, T: int) -> float:
    """f_CI(t) = 1 - f_CD(t)."""
    return 1.0 - f_cd(t, T)


def f_ei(t: int, T: int, alpha: float) -> float:
    """f_EI(t) = (1 - exp(-alpha t / (T - 1))) / (1 - exp(-alpha))."""
    return (1.0 - math.exp(-alpha * t / (T - 1))) / (1.0 - math.exp(-alpha))


def schedule_value(f: float, lam_min: float, lam_max: float) -> float:
    return (lam_max - lam_min) * f + lam_min


lam_pairs = st.tuples(
    st.floats(1e-8, 10.0, allow_nan=False), st.floats(1e-3, 1e3, allow_nan=False)
).map(lambda p: (p[0], p[0] + p[1]))
totals = st.integers(2, 1000)
alphas = st.floats(0.01, 100.0)


def build(kind: str, lam_min: float, lam_max: float, T: int, alpha: float):
    if kind == "cd":
        return CosineDecay(lam_min, lam_max, T)
    if kind == "ci":
        return CosineIncrease(lam_min, lam_max, T)
    return ExponentialIncrease(lam_min, lam_max, T, alpha=alpha)


def reference(kind: str, t: int, lam_min: float, lam_max: float, T: int, alpha: float) -> float:
    f = {"cd": lambda: f_cd(t, T), "ci": lambda: f_ci(t, T), "ei": lambda: f_ei(t, T, alpha)}
    return schedule_value(f[kind](), lam_min, lam_max)


@SETTINGS
@given(st.floats(1e-6, 1e3), st.integers(0, 10_000))
def test_constant_schedule(value, t):
    sched = ConstantSchedule(value)
    assert sched(t) == value
    assert sched(0) == value


@pytest.mark.parametrize("bad", [0.0, -1.0, -1e-12, math.nan, math.inf])
def test_constant_schedule_rejects(bad):
    with pytest.raises(ValueError):
        ConstantSchedule(bad)


@SETTINGS
@given(st.sampled_from(["cd", "ci", "ei"]), lam_pairs, totals, alphas)
def test_endpoints(kind, lams, T, alpha):
    lam_min, lam_max = lams
    sched = build(kind, lam_min, lam_max, T, alpha)
    first, last = sched(0), sched(T - 1)
    if kind == "cd":
        assert first == pytest.approx(lam_max, rel=1e-12)
        assert last == pytest.approx(lam_min, rel=1e-9, abs=1e-12 * lam_max)
    else:
        assert first == pytest.approx(lam_min, rel=1e-12)
        assert last == pytest.approx(lam_max, rel=1e-12)


@SETTINGS
@given(st.sampled_from(["cd", "ci", "ei"]), lam_pairs, totals, alphas)
def test_monotone_and_bounded(kind, lams, T, alpha):
    lam_min, lam_max = lams
    sched = build(kind, lam_min, lam_max, T, alpha)
    values = [sched(t) for t in range(T)]
    slack = 1e-12 * lam_max
    diffs = [b - a for a, b in zip(values, values[1:])]
    if kind == "cd":
        assert all(d <= slack for d in diffs)
        assert values[0] > values[-1]
    else:
        assert all(d >= -slack for d in diffs)
        assert values[-1] > values[0]
    assert all(lam_min - slack <= v <= lam_max + slack for v in values)
    assert all(v > 0 for v in values)


@SETTINGS
@given(st.sampled_from(["cd", "ci", "ei"]), lam_pairs, st.integers(3, 1000), alphas, st.data())
def test_values_match_closed_form(kind, lams, T, alpha, data):
    lam_min, lam_max = lams
    sched = build(kind, lam_min, lam_max, T, alpha)
    t = data.draw(st.integers(1, T - 2))
    expected = reference(kind, t, lam_min, lam_max, T, alpha)
    assert sched(t) == pytest.approx(expected, rel=1e-9, abs=1e-12 * lam_max)


def test_midpoints_known_values():
    # At the exact mid point of an odd T both cosine schedules sit half way.
    T = 11
    assert CosineDecay(1.0, 3.0, T)(5) == pytest.approx(2.0, rel=1e-14)
    assert CosineIncrease(1.0, 3.0, T)(5) == pytest.approx(2.0, rel=1e-14)
    # f_EI(1/2) = (1 - e^{-α/2}) / (1 - e^{-α}) = 1 / (1 + e^{-α/2}).
    alpha = 4.0
    expected = 1.0 + 2.0 / (1.0 + math.exp(-alpha / 2))
    assert ExponentialIncrease(1.0, 3.0, T, alpha=alpha)(5) == pytest.approx(expected, rel=1e-13)


def test_exponential_small_alpha_is_nearly_linear():
    sched = ExponentialIncrease(1.0, 2.0, 101, alpha=1e-6)
    for t in (0, 13, 50, 77, 100):
        assert sched(t) == pytest.approx(1.0 + t / 100, rel=1e-5)


@pytest.mark.parametrize("kind", ["cd", "ci", "ei"])
@pytest.mark.parametrize("t", [-1, 10, 11, 1000])
def test_out_of_range_t_raises(kind, t):
    sched = build(kind, 0.1, 1.0, 10, 10.0)
    with pytest.raises(ValueError):
        sched(t)


@pytest.mark.parametrize("kind", ["cd", "ci", "ei"])
@pytest.mark.parametrize(
    "lam_min, lam_max, T",
    [
        (0.0, 1.0, 10),
        (-0.1, 1.0, 10),
        (0.1, 0.0, 10),
        (0.1, -1.0, 10),
        (1.0, 0.5, 10),  # λ_max < λ_min
        (0.1, 1.0, 1),  # T < 2
        (0.1, 1.0, 0),
        (0.1, 1.0, -5),
        (math.nan, 1.0, 10),
        (0.1, math.inf, 10),
    ],
)
def test_interpolated_invalid_arguments(kind, lam_min, lam_max, T):
    with pytest.raises(ValueError):
        build(kind, lam_min, lam_max, T, 10.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan])
def test_exponential_invalid_alpha(alpha):
    with pytest.raises(ValueError):
        ExponentialIncrease(0.1, 1.0, 10, alpha=alpha)


def test_equal_bounds_are_constant():
    for sched in (CosineDecay(0.5, 0.5, 5), CosineIncrease(0.5, 0.5, 5),
                  ExponentialIncrease(0.5, 0.5, 5, alpha=3.0)):
        assert [sched(t) for t in range(5)] == pytest.approx([0.5] * 5, rel=1e-15)


@SETTINGS
@given(st.floats(1e-4, 50.0), st.sampled_from([torch.float32, torch.float64]))
def test_learnable_lambda(init, dtype):
    lam = LearnableLambda(init, dtype=dtype)
    (rho,) = lam.parameters()
    assert rho is lam.rho
    assert rho.requires_grad
    assert rho.dtype == dtype
    rho64 = rho.detach().double()
    # softplus written out independently: log(1 + e^rho).
    assert math.log1p(math.exp(float(rho64))) == pytest.approx(init, rel=1e-6)
    assert float(lam.value()) == pytest.approx(init, rel=1e-6)
    assert lam(0) == pytest.approx(init, rel=1e-6)
    assert lam(17) == lam(0)

    # derivative() == sigmoid(rho) == d softplus / d rho (autograd).
    deriv = lam.derivative()
    torch.testing.assert_close(deriv, torch.sigmoid(rho.detach()), rtol=0, atol=0)
    r = rho.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.softplus(r), r)
    torch.testing.assert_close(deriv, g, rtol=1e-6, atol=1e-7)
    sig = 1.0 / (1.0 + math.exp(-float(rho64)))
    assert float(deriv) == pytest.approx(sig, rel=1e-6)


def test_learnable_lambda_gradient_flows():
    lam = LearnableLambda(0.3, dtype=torch.float64)
    out = torch.nn.functional.softplus(lam.rho) * 2.0
    out.backward()
    torch.testing.assert_close(lam.rho.grad, 2.0 * lam.derivative(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_learnable_lambda_rejects(bad):
    with pytest.raises(ValueError):
        LearnableLambda(bad)


@pytest.mark.parametrize("damping,expected_damping", [(None, 7.0), (0.0, 0.0), (0, 0.0),
                                                       (2.5, 2.5)])
def test_learnable_lambda_gradient_scale_uses_its_own_damping(damping, expected_damping):
    # σ'(ρ)/(σ(ρ) + λ_damp^ρ), λ_damp^ρ = the problem's (7 here) only when damping is None.
    lam = LearnableLambda(0.4, dtype=torch.float64, damping=damping)
    rho = float(lam.rho.detach())
    sigma, dsigma = math.log1p(math.exp(rho)), 1.0 / (1.0 + math.exp(-rho))
    expected = dsigma / (sigma + expected_damping)
    assert float(lam.gradient_scale(7.0)) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "1"])
def test_learnable_lambda_rejects_bad_damping(bad):
    with pytest.raises(ValueError, match="damping"):
        LearnableLambda(0.5, damping=bad)


def test_as_lambda_passthrough_and_float():
    sched = CosineDecay(0.1, 1.0, 5)
    assert as_lambda(sched) is sched
    learn = LearnableLambda(0.5)
    assert as_lambda(learn) is learn
    const = as_lambda(0.25)
    assert isinstance(const, ConstantSchedule)
    assert const(0) == 0.25 and const(99) == 0.25
    assert as_lambda(3)(0) == 3.0


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, -math.inf, math.inf])
def test_as_lambda_rejects_bad_numbers(bad):
    with pytest.raises(ValueError):
        as_lambda(bad)


@pytest.mark.parametrize("bad", [True, False, "0.1", "abc", None, [0.1]])
def test_as_lambda_rejects_bad_types(bad):
    # The implementation raises TypeError for a wrong type; its docstring promises ValueError.
    # Either is a rejection: what matters is that a bool or a string never becomes a λ.
    with pytest.raises((TypeError, ValueError)):
        as_lambda(bad)


@SETTINGS
@given(st.floats(1e-6, 1e6))
def test_as_lambda_positive_floats(value):
    assume(math.isfinite(value))
    assert as_lambda(value)(5) == value

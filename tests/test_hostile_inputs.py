"""Hostile inputs to the library: a metrics log that must match the checkpoint after a kill or a
failed save, two corrupt checkpoint files, and inputs that would otherwise give a silently wrong
hypergradient (mismatched or shared levels, names as one string, non-integer solver settings, a
curvature operator outliving its point, dropout across the forward-mode fallback, non-finite
gradients)."""

from __future__ import annotations

import json

import pytest
import torch
from test_bissl import _Pair

import implicitbilevel as ib
import implicitbilevel.bissl
from implicitbilevel.bissl import BiSSLTrainer
from implicitbilevel.bissl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _alternations(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().strip().splitlines()
    return [json.loads(line)["alternation"] for line in lines]


def test_a_failed_save_then_a_resume_logs_each_alternation_once(tmp_path, monkeypatch):
    original, calls = BiSSLTrainer.save, []

    def failing(self):
        calls.append(self.alternation)
        if len(calls) == 2:  # the save after alternation 1 fails (e.g. a full disk)
            raise OSError("no space left on device")
        original(self)

    monkeypatch.setattr(BiSSLTrainer, "save", failing)
    with pytest.raises(OSError, match="no space"):
        _Pair(out_dir=tmp_path).trainer().run()
    monkeypatch.setattr(BiSSLTrainer, "save", original)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["alternation"] == 1
    assert _alternations(tmp_path) == [0, 1]  # alternation 1 logged, its save failed
    history = _Pair(out_dir=tmp_path).trainer().run(resume=True)
    assert [h["alternation"] for h in history] == [0, 1, 2, 3]
    assert _alternations(tmp_path) == [0, 1, 2, 3]


def test_a_kill_between_checkpoints_then_a_resume_logs_each_alternation_once(tmp_path,
                                                                             monkeypatch):
    original = BiSSLTrainer._upper_stage

    def killed(self, t):
        if t == 3:
            raise KeyboardInterrupt
        return original(self, t)

    pair = _Pair(out_dir=tmp_path)
    pair.config.checkpoint_every = 2
    monkeypatch.setattr(BiSSLTrainer, "_upper_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        pair.trainer().run()
    monkeypatch.setattr(BiSSLTrainer, "_upper_stage", original)
    assert _alternations(tmp_path) == [0, 1, 2]  # alternation 2 logged, not checkpointed
    assert load_checkpoint(tmp_path / "checkpoint.pt")["alternation"] == 2
    resumed = _Pair(out_dir=tmp_path)
    resumed.config.checkpoint_every = 2
    history = resumed.trainer().run(resume=True)
    assert [h["alternation"] for h in history] == [0, 1, 2, 3]
    assert _alternations(tmp_path) == [0, 1, 2, 3]


def test_both_checkpoint_files_corrupt_is_not_called_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"a": torch.ones(3)}, path)
    save_checkpoint({"a": torch.full((3,), 2.0)}, path)
    for name in ("ckpt.pt", "ckpt.pt.prev"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:20])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "intact" not in str(err.value) and "corrupt too" in str(err.value)


# -- library inputs that would otherwise give a silently wrong answer ---------------------------


def _problem(upper_loss=None, **kw):
    """``f = Σ (x − 1)² + Σ y²``, ``ℓ = Σ exp(y)·a``: small, smooth, finite everywhere."""
    def f(x, y, batch):
        return ((x["w"] - 1) ** 2).sum() + (y["w"] ** 2).sum()

    def lower(y, batch):
        return (torch.exp(y["w"]) * batch).sum()

    return ib.BilevelProblem(upper_loss or f, lower, lam=1.0, **kw)


def _levels(n=5, dtype=torch.float64):
    return {"w": torch.linspace(-1, 1, n, dtype=dtype)}, {"w": torch.linspace(0, 0.5, n,
                                                                             dtype=dtype)}


def test_coupled_names_must_match_in_shape_dtype_and_device():
    upper, lower = _levels()
    batch = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'w' has shape \(1,\) at the upper level but \(5,\)"):
        _problem().lower_grad({"w": torch.ones(1, dtype=torch.float64)}, lower, batch)
    with pytest.raises(ValueError, match="dtype torch.float32 at the upper level"):
        _problem(regularizer=ib.ProximalL2(["w"])).lower_grad(
            {"w": upper["w"].float()}, lower, batch)
    with pytest.raises(ValueError, match="device meta at the upper level"):
        ib.ProximalL2().coupled_names({"w": torch.empty(5, dtype=torch.float64, device="meta")},
                                      lower)
    g = _problem().lower_grad(upper, lower, batch).grads["w"]  # matching copies are fine:
    assert torch.allclose(g, torch.exp(lower["w"]) + (lower["w"] - upper["w"]), atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda: ib.ProximalL2("theta"),
    lambda: ib.Regularizer(lambda x, y: (y["w"] ** 2).sum(), lower_names="w"),
    lambda: ib.bissl.bissl_upper_loss(lambda p, b: p["w"].sum(), "w"),
    lambda: ib.ProximalL2([0, 1]),
], ids=["ProximalL2", "Regularizer.lower_names", "bissl_upper_loss", "non-string-names"])
def test_names_given_as_one_string_are_refused(make):
    with pytest.raises(TypeError, match="list of names|parameter names"):
        make()


@pytest.mark.parametrize("make", [
    lambda: ib.CG(max_iter=2.5),
    lambda: ib.MINRES(max_iter=2.0),
    lambda: ib.Neumann(max_iter=2.5),
    lambda: ib.Dense(max_dim=True),
    lambda: ib.Dense(max_dim=10.0),
    lambda: ib.NystromSolver(rank=3, seed=1.5),
    lambda: ib.NystromPreconditioner(rank=3.0),
    lambda: ib.NystromPreconditioner(seed=0.5),
    lambda: ib.nystrom_approximation(lambda z: z, {"w": torch.ones(4)}, 2, seed=0.5),
    lambda: ib.CG(tol=float("inf")),
    lambda: ib.MINRES(atol=float("nan")),
    lambda: ib.Neumann(alpha=float("inf")),
    lambda: ib.CG(warm_start=2),
    lambda: ib.CG(blockwise=1),
    lambda: ib.CG(preconditioner="nystrom"),
    lambda: ib.NystromSolver(measure_residual="yes"),
], ids=lambda f: None)
def test_solver_settings_have_their_types(make):
    with pytest.raises((TypeError, ValueError), match=r"must be (an int|a finite|True or|None)"):
        make()


@pytest.mark.parametrize("reuse", [True, False])
def test_a_kept_lower_hessian_refuses_a_point_changed_in_place(reuse):
    upper, lower = _levels()
    batch = torch.linspace(1, 2, 5, dtype=torch.float64)
    problem = _problem(ij=ib.ImplicitJacobian(damping=1.0, reuse_graph=reuse))
    op = problem.lower_hessian(upper, lower, batch)
    fresh = problem.upper_grad(upper, lower, None, batch, lower_hessian=op).grads["w"]
    # H = diag(a·exp(y)), A = I + H/μ, μ = 2: dF/dx = 2(x − 1) + A⁻¹ 2y (eq. 4.9)
    a_diag = 1 + batch * torch.exp(lower["w"]) / 2
    assert torch.allclose(fresh, 2 * (upper["w"] - 1) + 2 * lower["w"] / a_diag, atol=1e-12)
    lower["w"].add_(0.25)  # e.g. a lower optimiser step between building and using the operator
    with pytest.raises(RuntimeError, match=r"modified in place.*\['w'\].*lower_hessian"):
        problem.upper_grad(upper, lower, None, batch, lower_hessian=op)
    with pytest.raises(RuntimeError, match="modified in place"):
        op({"w": torch.ones(5, dtype=torch.float64)})


class _NoForwardMode(torch.autograd.Function):
    """``x ↦ x³`` without a forward-mode rule (the ``auto`` mode falls back to double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


@pytest.mark.filterwarnings("ignore:forward-over-reverse HVP failed")
def test_dropout_masks_are_pinned_across_the_forward_mode_fallback():
    torch.manual_seed(0)
    w0 = torch.randn(6, dtype=torch.float64)
    batch = torch.randn(6, dtype=torch.float64)

    def loss(p, x):
        h = torch.nn.functional.dropout(torch.tanh(p["w"] * x), 0.5, training=True)
        return _NoForwardMode.apply(h.sum() / 2) + (p["w"] ** 2).sum()

    state = torch.random.get_rng_state()
    op = ib.HessianOperator(loss, {"w": w0}, batch, mode="auto", reuse=False)
    columns = torch.stack([op({"w": e})["w"] for e in torch.eye(6, dtype=torch.float64)], 1)
    assert op.mode == "reverse-over-reverse"  # the first product fell back
    torch.random.set_rng_state(state)  # the mask the operator pinned at construction
    dense = torch.autograd.functional.hessian(lambda w: loss({"w": w}, batch), w0)
    curved = (dense - 2 * torch.eye(6, dtype=torch.float64)).abs().sum(1) > 0
    assert 2 <= int(curved.sum()) <= 5  # some units kept (coupled to each other), some dropped
    assert torch.allclose(columns, dense, atol=1e-12)
    assert torch.allclose(columns, columns.T, atol=1e-12)


def test_upper_and_lower_dicts_sharing_tensors_are_refused():
    upper, lower = _levels()
    batch = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"share tensors \(upper 'w' is lower 'w'\)"):
        _problem().lower_grad(upper, upper, batch)
    with pytest.raises(ValueError, match="share tensors"):
        _problem().upper_grad(upper, dict(upper), None, batch)
    with pytest.raises(ValueError, match="same tensor under 'w'.*identically zero"):
        _problem().lower_grad(upper, {"w": upper["w"].detach()}, batch)
    assert _problem().lower_grad(upper, lower, batch).regularizer > 0


def test_check_finite_covers_the_returned_gradients():
    upper, lower = _levels()
    batch = torch.ones(5, dtype=torch.float64)
    upper["w"][2] = float("nan")  # the lower loss is finite, λ(θ_P − θ_D) is not
    with pytest.raises(ib.NonFiniteError, match=r"lower-level gradient of 'w' at alternation 3"):
        _problem().lower_grad(upper, lower, batch, t=3)
    assert _problem(check_finite=False).lower_grad(upper, lower, batch).grads["w"][2].isnan()

    def sqrt_loss(x, y, batch):  # finite at x = 0, its gradient is not
        return torch.sqrt(x["w"]).sum() + (y["w"] ** 2).sum()

    upper = {"w": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(ib.NonFiniteError, match=r"upper-level gradient.*of 'w'"):
        _problem(sqrt_loss).upper_grad(upper, lower, None, batch)
    assert _problem(sqrt_loss, check_finite=False).upper_grad(
        upper, lower, None, batch).grads["w"].isinf().all()


class _ShortPass:
    """A loader whose length (4) promises more batches than a pass yields (2)."""

    def __len__(self):
        return 4

    def __iter__(self):
        return iter([torch.zeros(1), torch.ones(1)])


def test_a_pass_shorter_than_its_length_is_named_not_a_bare_stop_iteration():
    from implicitbilevel.bissl.batch_stack import BatchStack

    stack = BatchStack(_ShortPass())
    stack.reserve(4)
    assert [float(stack.next()) for _ in range(2)] == [0.0, 1.0]
    with pytest.raises(RuntimeError, match="pass ended after 2 batches, but its length says 4"):
        stack.next()
    resumed = BatchStack(_ShortPass())
    with pytest.raises(RuntimeError, match="pass ended after 2 batches"):
        resumed.load_state_dict({"consumed": 3, "passes": 1, "pass_rng": torch.get_rng_state()})

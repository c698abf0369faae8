"""The BiSSL trainer (Algorithm 2) and its checkpoints.

- One alternation on a linear-quadratic problem against the updates computed by hand.
- Batch stacks regenerate only when a stage cannot be completed from the remaining batches.
- The λ the trainer uses is the schedule's value at each alternation.
- A run stopped after alternation k and resumed ends bit-identical to an uninterrupted run.
- Batch stacks on a loader with fewer batches than a stage: full batches only, a new shuffled pass
  whenever one is exhausted (Sec. 6.1.3).
- Learnable λ: ρ's gradient clipped with the upper level's (against a hand computation), and ρ and
  its optimiser state restored bit-identically on resume.
- Non-finite losses, corrupt checkpoints and bad configurations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from implicitbilevel import (
    CG,
    BilevelProblem,
    CosineIncrease,
    Dense,
    ImplicitJacobian,
    LearnableLambda,
    NonFiniteError,
    ProximalL2,
    functional_module,
)
from implicitbilevel.bissl import BatchStack, BiSSLConfig, BiSSLTrainer, bissl_upper_loss
from implicitbilevel.bissl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

D = torch.float64


def test_bissl_upper_loss_substitutes_only_the_backbone():
    calls = []

    def downstream(params, batch):
        calls.append({n: p.clone() for n, p in params.items()})
        return params["b"].sum() + params["h"].sum()

    f = bissl_upper_loss(downstream, ["b"])
    upper = {"b": torch.tensor([1.0]), "h": torch.tensor([2.0])}
    lower = {"b": torch.tensor([5.0]), "p": torch.tensor([7.0])}
    assert float(f(upper, lower, None)) == pytest.approx((5 + 2) + (1 + 2))
    assert float(calls[0]["b"]) == 5 and float(calls[0]["h"]) == 2 and "p" not in calls[0]
    assert float(calls[1]["b"]) == 1


def test_one_alternation_matches_hand_computed_updates():
    g = torch.Generator().manual_seed(0)
    n, k = 4, 3
    m = torch.randn(n, n, generator=g, dtype=D)
    q = m @ m.T / n + 0.5 * torch.eye(n, dtype=D)  # pretext Hessian (constant)
    c = torch.randn(n, generator=g, dtype=D)
    b_mat = torch.randn(k, n, generator=g, dtype=D)
    target = torch.randn(k, generator=g, dtype=D)
    lam, damping, lr_lower, lr_upper = 0.3, 2.0, 0.1, 0.05

    def pretext(p, batch):
        (scale,) = batch
        return scale.mean() * (0.5 * p["th"] @ q @ p["th"] + c @ p["th"])

    def downstream(p, batch):
        (scale,) = batch
        return scale.mean() * 0.5 * ((b_mat @ p["th"] + p["bias"] - target) ** 2).sum()

    theta0 = torch.randn(n, generator=g, dtype=D)
    upper = {"th": theta0.clone().requires_grad_(),
             "bias": torch.zeros(k, dtype=D).requires_grad_()}
    lower = {"th": theta0.clone().requires_grad_()}
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=lam,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(Dense(), damping=damping))
    ones = TensorDataset(torch.ones(2, 1, dtype=D))
    trainer = BiSSLTrainer(
        problem, upper, lower,
        torch.optim.SGD(list(upper.values()), lr=lr_upper),
        torch.optim.SGD(list(lower.values()), lr=lr_lower),
        DataLoader(ones, batch_size=1), DataLoader(ones, batch_size=1),
        BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, grad_clip=None, progress=False),
    )
    trainer.run()

    # By hand: one lower SGD step on G, then one upper step with the damped IJ of Algorithm 3.
    th_p = theta0 - lr_lower * (q @ theta0 + c + lam * (theta0 - theta0))
    residual_p = b_mat @ th_p - target
    v = b_mat.T @ residual_p
    ij = torch.linalg.solve(torch.eye(n, dtype=D) + q / (lam + damping), v)
    residual_d = b_mat @ theta0 - target
    th_d = theta0 - lr_upper * (ij + b_mat.T @ residual_d)
    bias = -lr_upper * (residual_p + residual_d)
    assert torch.allclose(lower["th"].detach(), th_p, rtol=1e-12)
    assert torch.allclose(upper["th"].detach(), th_d, rtol=1e-10)
    assert torch.allclose(upper["bias"].detach(), bias, rtol=1e-10)


class _Numbered:
    """A loader whose batches are numbered by pass: (pass, index)."""

    def __init__(self, size):
        self.size, self.passes = size, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        self.passes += 1
        return iter([(self.passes, i) for i in range(self.size)])


def test_batch_stack_regenerates_only_when_a_stage_cannot_be_completed():
    loader = _Numbered(7)
    stack = BatchStack(loader)
    taken = []
    for _ in range(3):  # stages of 3 batches: 7 = 3 + 3 + (1 left → new pass)
        stack.reserve(3)
        taken.append([stack.next() for _ in range(3)])
    assert taken[0] == [(1, 0), (1, 1), (1, 2)]
    assert taken[1] == [(1, 3), (1, 4), (1, 5)]
    assert taken[2] == [(2, 0), (2, 1), (2, 2)]
    assert stack.passes == 2 and stack.remaining == 4


def test_batch_stack_cycles_a_loader_shorter_than_a_stage():
    stack = BatchStack(_Numbered(2))
    stack.reserve(5)
    assert [stack.next() for _ in range(5)] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]


def test_batch_stack_rejects_empty_or_unsized_data():
    with pytest.raises(ValueError, match="empty"):
        BatchStack([])
    with pytest.raises(TypeError, match="length"):
        BatchStack(iter([1, 2]))


def _indices(batch):
    (idx,) = batch
    return idx.tolist()


def test_batch_stack_skips_a_trailing_partial_batch_and_cycles_short_loaders():
    # 10 examples in batches of 4: two full batches per pass, the 2-example remainder never used.
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    stack = BatchStack(loader)
    assert stack.size == 2
    stack.reserve(8)
    taken = [_indices(stack.next()) for _ in range(8)]
    assert taken == [[0, 1, 2, 3], [4, 5, 6, 7]] * 4
    assert stack.passes == 4
    # A loader with enough full batches: the pass still ends before its partial batch.
    stack = BatchStack(DataLoader(TensorDataset(torch.arange(11)), batch_size=4))
    stack.reserve(2)
    assert [_indices(stack.next()) for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    stack.reserve(2)
    assert stack.passes == 2 and _indices(stack.next()) == [0, 1, 2, 3]
    # Sizes: full batches only; drop_last and exact multiples as the loader has them; a loader
    # whose only batch is partial keeps it.
    sizes = [BatchStack(DataLoader(TensorDataset(torch.arange(n)), batch_size=4, drop_last=drop))
             .size for n, drop in [(11, True), (12, False), (13, False), (3, False)]]
    assert sizes == [2, 3, 3, 1]
    only = BatchStack(DataLoader(TensorDataset(torch.arange(3)), batch_size=4))
    assert _indices(only.next()) == [0, 1, 2] and _indices(only.next()) == [0, 1, 2]


def test_batch_stack_skipping_partial_batches_resumes_exactly():
    def loader():
        return DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True)

    torch.manual_seed(5)
    stack = BatchStack(loader())
    head = [_indices(stack.next()) for _ in range(3)]  # into the second pass
    state, rng = stack.state_dict(), torch.random.get_rng_state()  # the trainer saves both
    reference = [_indices(stack.next()) for _ in range(5)]
    torch.manual_seed(99)
    resumed = BatchStack(loader())
    resumed.load_state_dict(state)
    torch.random.set_rng_state(rng)
    assert [_indices(resumed.next()) for _ in range(5)] == reference
    assert all(len(b) == 4 for b in head + reference)


def test_trainer_on_fewer_batches_than_upper_steps_uses_full_reshuffled_passes():
    # Thesis Sec. 6.1.3: with fewer than N_U batches the data is reshuffled and the stack remade
    # once fewer examples than a batch remain. 10 examples, batch size 4, N_U = 8.
    pair = _Pair(alternations=2)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    pair.upper_loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    pair.config.upper_steps = 8
    used = []
    original = pair.problem.upper_grad

    def spy(upper, lower, batch, *args, **kwargs):
        # Which of the 10 examples are in the batch, by their (distinct) feature rows.
        used.append([int(torch.cdist(row[None], x).argmin()) for row in batch[0]])
        assert torch.equal(batch[0], x[used[-1]])
        return original(upper, lower, batch, *args, **kwargs)

    pair.problem.upper_grad = spy
    trainer = pair.trainer()
    trainer.run()
    assert len(used) == 2 * 8 and all(len(b) == 4 for b in used)
    passes = [used[i] + used[i + 1] for i in range(0, len(used), 2)]  # 2 full batches a pass
    assert trainer.upper_stack.passes == len(passes) == 8
    assert all(len(set(p)) == 8 and set(p) <= set(range(10)) for p in passes)
    assert all(a != b for a, b in zip(passes, passes[1:]))  # every pass reshuffled


# -- a small BatchNorm model pair for the loop-level tests -----------------------------------------


class _Pair:
    def __init__(self, seed=0, lam=None, alternations=4, out_dir=None, learnable=None,
                 nan_at=None):
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.downstream = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(8, 3)})
        self.pretext = nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                                      "proj": nn.Linear(8, 4)})
        down = functional_module(_Seq(self.downstream, "head"))
        pre = functional_module(_Seq(self.pretext, "proj"))
        self.lower_calls = 0

        def downstream_loss(p, batch):
            x, y = batch
            return nn.functional.cross_entropy(down({"m." + k: v for k, v in p.items()}, x), y)

        def pretext_loss(p, batch):
            (x,) = batch
            self.lower_calls += 1
            z = pre({"m." + k: v for k, v in p.items()}, x)
            loss = ((z - x[:, :4]) ** 2).mean()
            return loss * float("nan") if nan_at is not None and self.lower_calls > nan_at else loss

        self.upper = dict(self.downstream.named_parameters())
        self.lower = dict(self.pretext.named_parameters())
        backbone_names = [n for n in self.upper if n.startswith("backbone.")]
        self.lam = learnable if learnable is not None else (lam or 0.1)
        self.problem = BilevelProblem(bissl_upper_loss(downstream_loss, backbone_names),
                                      pretext_loss, lam=self.lam,
                                      regularizer=ProximalL2(backbone_names),
                                      ij=ImplicitJacobian(CG(max_iter=5), damping=10.0))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
        self.upper_loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        self.lower_loader = DataLoader(TensorDataset(torch.randn(80, 5, generator=g)),
                                       batch_size=16, shuffle=True)
        upper_params = list(self.downstream.parameters())
        self.upper_opt = torch.optim.SGD(upper_params, lr=0.05, momentum=0.9)
        if learnable is not None:
            self.upper_opt.add_param_group({"params": learnable.parameters(), "lr": 0.5})
        self.lower_opt = torch.optim.SGD(self.pretext.parameters(), lr=0.1, momentum=0.9)
        self.lower_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.lower_opt, 50)
        self.config = BiSSLConfig(alternations=alternations, lower_steps=3, upper_steps=2,
                                  progress=False)
        self.out_dir = out_dir

    def trainer(self):
        return BiSSLTrainer(self.problem, self.upper, self.lower, self.upper_opt, self.lower_opt,
                            self.upper_loader, self.lower_loader, self.config,
                            lower_scheduler=self.lower_sched, out_dir=self.out_dir,
                            modules={"downstream": self.downstream, "pretext": self.pretext})


class _Seq(nn.Module):
    def __init__(self, modules, head):
        super().__init__()
        self.m = modules
        self.head = head

    def forward(self, x):
        return self.m[self.head](self.m["backbone"](x))


def test_trainer_uses_the_lambda_schedule_value_at_each_alternation():
    schedule = CosineIncrease(lam_min=1e-3, lam_max=1.0, total=4)
    pair = _Pair(lam=schedule)
    seen = []
    original = pair.problem.lower_grad

    def spy(upper, lower, batch, t=0):
        out = original(upper, lower, batch, t=t)
        seen.append((t, out.lam))
        return out

    pair.problem.lower_grad = spy
    history = pair.trainer().run()
    assert [h["lam"] for h in history] == [schedule(t) for t in range(4)]
    assert all(lam == schedule(t) for t, lam in seen) and len(seen) == 4 * 3
    # 2 upper steps × 5 CG products, plus the one that measures the last solve's true residual.
    assert all(h["solver_iterations"] == 5 and h["hessian_products"] == 11 for h in history)
    assert all(0 <= h["ij_relative_residual"] < 10 for h in history)


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    full = _Pair(out_dir=tmp_path / "full")
    full.trainer().run()

    interrupted = _Pair(out_dir=tmp_path / "cut")
    interrupted.config.alternations = 2
    interrupted.trainer().run()
    resumed = _Pair(seed=123, out_dir=tmp_path / "cut")  # different init: all must come from disk
    # The cut run stopped by a smaller T; continuing under T = 4 is a change the resume names.
    with pytest.raises(ValueError, match=r"alternations: 2 -> 4"):
        resumed.trainer().run(resume=True)
    history = resumed.trainer().run(resume=True, allow_changed_config=True)
    assert history[2]["changed_config"] == {"alternations": [2, 4]}

    assert len(history) == 4
    for module in ("downstream", "pretext"):
        a = getattr(full, module).state_dict()
        b = getattr(resumed, module).state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), (module, name)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 4


def test_learnable_lambda_is_updated_and_must_be_optimised():
    learnable = LearnableLambda(0.05)
    pair = _Pair(learnable=learnable)
    before = float(learnable.value())
    history = pair.trainer().run()
    assert float(learnable.value()) != before
    assert all("lam_grad" in h for h in history)
    assert history[-1]["lam"] == pytest.approx(float(learnable.value()), rel=0.5)

    orphan = LearnableLambda(0.05)
    pair = _Pair()
    pair.problem = BilevelProblem(pair.problem.upper_loss, pair.problem.lower_loss, lam=orphan,
                                  regularizer=pair.problem.regularizer)
    with pytest.raises(ValueError, match=r"'lam.rho' \(problem.params\) is not in the upper opt"):
        pair.trainer()


def test_learnable_lambda_gradient_is_clipped_with_the_upper_level():
    # One alternation of a linear-quadratic problem with a learnable λ, the gradient of the
    # upper level and of ρ computed by hand; a small grad_clip must scale them all by one factor.
    g = torch.Generator().manual_seed(2)
    n, k = 4, 3
    m = torch.randn(n, n, generator=g, dtype=D)
    q = m @ m.T / n + 0.5 * torch.eye(n, dtype=D)
    c = torch.randn(n, generator=g, dtype=D)
    b_mat = torch.randn(k, n, generator=g, dtype=D)
    target = torch.randn(k, generator=g, dtype=D)
    lam0, damping, lam_damping, lr_lower, clip = 0.05, 2.0, 0.0, 0.3, 0.01

    def pretext(p, batch):
        return 0.5 * p["th"] @ q @ p["th"] + c @ p["th"]

    def downstream(p, batch):
        return 0.5 * ((b_mat @ p["th"] + p["bias"] - target) ** 2).sum()

    theta0 = torch.randn(n, generator=g, dtype=D)
    upper = {"th": theta0.clone().requires_grad_(),
             "bias": torch.zeros(k, dtype=D).requires_grad_()}
    lower0 = theta0 + 2.0 * torch.randn(n, generator=g, dtype=D)  # θ_P away from θ_D
    lower = {"th": lower0.clone().requires_grad_()}
    lam = LearnableLambda(lam0, dtype=D, damping=lam_damping)
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=lam,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(Dense(), damping=damping))
    assert problem.params == {"lam.rho": lam.rho}
    upper_opt = torch.optim.SGD([*upper.values(), lam.rho], lr=0.0)  # grads stay for inspection
    ones = TensorDataset(torch.ones(1, 1, dtype=D))
    trainer = BiSSLTrainer(
        problem, upper, lower, upper_opt, torch.optim.SGD(list(lower.values()), lr=lr_lower),
        DataLoader(ones, batch_size=1), DataLoader(ones, batch_size=1),
        BiSSLConfig(alternations=1, lower_steps=1, upper_steps=1, grad_clip=clip, progress=False),
    )
    history = trainer.run()

    # By hand: one clipped lower SGD step on G, then the upper gradient and eq. 5.6 at θ_P.
    rho = float(lam.rho.detach())
    sigma, dsigma = math.log1p(math.exp(rho)), 1.0 / (1.0 + math.exp(-rho))
    lower_grad = q @ lower0 + c + sigma * (lower0 - theta0)
    th_p = lower0 - lr_lower * lower_grad * min(1.0, clip / (float(lower_grad.norm()) + 1e-6))
    residual_p = b_mat @ th_p - target
    u = torch.linalg.solve(torch.eye(n, dtype=D) + q / (sigma + damping), b_mat.T @ residual_p)
    residual_d = b_mat @ theta0 - target
    raw = {"th": u + b_mat.T @ residual_d, "bias": residual_p + residual_d,
           "rho": dsigma / (sigma + lam_damping) * (theta0 - th_p) @ u}
    norm = math.sqrt(sum(float((v**2).sum()) for v in raw.values()))
    assert float(raw["rho"]) ** 2 / norm**2 > 1e-3  # ρ matters for the norm
    factor = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    assert factor < 0.1
    assert torch.allclose(upper["th"].grad, raw["th"] * factor, rtol=1e-10, atol=0)
    assert torch.allclose(upper["bias"].grad, raw["bias"] * factor, rtol=1e-10, atol=0)
    assert float(lam.rho.grad) == pytest.approx(float(raw["rho"]) * factor, rel=1e-10)
    assert history[0]["upper_grad_norm"] == pytest.approx(norm, rel=1e-10)
    assert history[0]["lam_grad"] == pytest.approx(float(raw["rho"]), rel=1e-10)  # unclipped


def test_learnable_lambda_resumes_bit_identical(tmp_path):
    full = _Pair(out_dir=tmp_path / "full", learnable=LearnableLambda(0.05))
    full.trainer().run()

    cut = _Pair(out_dir=tmp_path / "cut", learnable=LearnableLambda(0.05))
    cut.config.alternations = 2
    cut.trainer().run()
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["upper_params"]["lam.rho"].dtype == torch.float32  # one entry, with θ_D, φ_D
    assert "lam_rho" not in saved
    # Different init and λ: everything must come from disk.
    resumed = _Pair(seed=123, out_dir=tmp_path / "cut", learnable=LearnableLambda(0.7))
    resumed.trainer().run(resume=True, allow_changed_config=True)  # T: 2 -> 4

    assert float(full.lam.rho.detach()) != pytest.approx(float(LearnableLambda(0.05).rho.detach()))
    assert torch.equal(full.lam.rho.detach(), resumed.lam.rho.detach())
    a, b = full.upper_opt.state_dict(), resumed.upper_opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    rho_index = len(list(full.downstream.parameters()))  # ρ's group comes last
    assert rho_index in a["state"]
    for i, entry in a["state"].items():
        assert torch.equal(entry["momentum_buffer"], b["state"][i]["momentum_buffer"]), i
    for module in ("downstream", "pretext"):
        x, y = getattr(full, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(x[name], y[name]) for name in x), module


def test_format_1_checkpoint_with_separate_lambda_loads(tmp_path):
    # Format 1 kept ρ apart from the upper parameters under "lam_rho"; it still resumes.
    pair = _Pair(learnable=LearnableLambda(0.05))
    pair.config.alternations = 1
    trainer = pair.trainer()
    trainer.run()
    state = trainer.state_dict()
    old = {**state, "format": "implicitbilevel.bissl/1",
           "upper_params": {n: t for n, t in state["upper_params"].items() if n != "lam.rho"},
           "lam_rho": state["upper_params"]["lam.rho"]}
    other = _Pair(seed=4, learnable=LearnableLambda(0.9))
    other.config.alternations = 1
    restored = other.trainer()
    restored.load_state_dict(old)
    assert torch.equal(other.lam.rho.detach(), pair.lam.rho.detach())
    assert restored.alternation == 1
    with pytest.raises(CheckpointError, match="format"):
        restored.load_state_dict({**state, "format": "something/3"})


def test_trainer_rejects_upper_params_named_like_problem_params():
    learnable = LearnableLambda(0.05)
    pair = _Pair(learnable=learnable)
    pair.upper["lam.rho"] = learnable.rho
    with pytest.raises(ValueError, match="must not contain the problem's own parameters"):
        pair.trainer()


@pytest.mark.parametrize("nan_at,where,last_good", [
    (8, "lower level, alternation 2, lower step 0", 2),  # 4 pretext calls per alternation
    (7, "upper level, alternation 1, Hessian", 1),       # the 4th call builds the Hessian
])
def test_non_finite_loss_names_level_and_step_and_keeps_last_checkpoint(
    tmp_path, nan_at, where, last_good
):
    pair = _Pair(out_dir=tmp_path, nan_at=nan_at)
    with pytest.raises(NonFiniteError, match=where):
        pair.trainer().run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["alternation"] == last_good


def test_corrupt_checkpoint_is_detected_and_previous_is_kept(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"a": torch.ones(3)}, path)
    save_checkpoint({"a": torch.full((3,), 2.0)}, path)
    path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match="intact"):
        load_checkpoint(path)
    previous = load_checkpoint(tmp_path / "ckpt.pt.prev")
    assert torch.equal(previous["a"], torch.ones(3))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_refuses_code_execution(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value", [("alternations", 0), ("lower_steps", 1.5),
                                         ("upper_steps", -1), ("grad_clip", 0.0),
                                         ("autocast", "fp16")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        BiSSLConfig(**{field: value})

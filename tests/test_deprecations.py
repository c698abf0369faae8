"""The spellings of the release before :class:`~implicitbilevel.ImplicitJacobian`, kept for one
release on purpose (every other test uses the new spelling):

- the old implicit-Jacobian keywords of :class:`~implicitbilevel.BilevelProblem` (``ij=<solver>``,
  ``damping``, ``curvature``, ``solve_over``, ``head_damping``, ``ij_subset``, ``ij_outside``,
  ``hvp_mode``, ``reuse_graph``, ``on_breakdown``) and of :func:`~implicitbilevel.argmin`
  (``solver``, ``curvature``, ``hvp_mode``, ``reuse_graph``, ``damping``, ``on_breakdown``) give
  the same float64 hypergradient as the ``ImplicitJacobian`` they stand for, with a
  ``DeprecationWarning`` naming it and pointing at the caller;
- an ``ImplicitJacobian`` mixed with an old keyword, or an unknown keyword, is a ``TypeError``;
- every old module path still gives each name its ``__all__`` listed (as of commit 4115803), with
  a ``DeprecationWarning`` whose advice (``import NAME from MODULE``) is right;
- every name ``implicitbilevel`` and ``implicitbilevel.bissl`` exported then still imports from
  the package, without a warning.
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch

import implicitbilevel
import implicitbilevel.bissl
from implicitbilevel import (
    CG,
    MFAC,
    MINRES,
    BilevelProblem,
    Dense,
    GaussNewton,
    ImplicitJacobian,
    ProximalL2,
    argmin,
)
from implicitbilevel.bissl import bissl_upper_loss

F64 = torch.float64

# -- BilevelProblem ------------------------------------------------------------------------------


def _levels():
    """Two coupled backbone tensors and a lower-only head, small and smooth, in float64."""
    g = torch.Generator().manual_seed(0)
    x_p, x_d = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(10, 3, generator=g,
                                                                         dtype=F64)
    t_p, t_d = torch.randn(12, 2, generator=g, dtype=F64), torch.randn(10, generator=g, dtype=F64)
    upper = {"a": 0.5 * torch.randn(4, 3, generator=g, dtype=F64),
             "b": 0.5 * torch.randn(4, generator=g, dtype=F64),
             "head_d": 0.5 * torch.randn(4, generator=g, dtype=F64)}
    lower = {"a": upper["a"] + 0.1 * torch.randn(4, 3, generator=g, dtype=F64),
             "b": upper["b"] + 0.1 * torch.randn(4, generator=g, dtype=F64),
             "head_p": 0.5 * torch.randn(2, 4, generator=g, dtype=F64)}

    def features(p, x):
        return torch.tanh(x @ p["a"].T + p["b"])

    def outputs(p, batch):
        return features(p, x_p) @ p["head_p"].T

    def output_loss(z, batch):
        return 0.5 * ((z - t_p) ** 2).mean()

    def pretext(p, batch):
        return output_loss(outputs(p, batch), batch)

    def downstream(p, batch):
        return ((features(p, x_d) @ p["head_d"] - t_d) ** 2).mean()

    upper_loss = bissl_upper_loss(downstream, ["a", "b"])
    return upper_loss, pretext, GaussNewton(outputs, output_loss), upper, lower


def _bilevel_cases():
    """``(id, old keywords, the ImplicitJacobian they stand for)``, fresh solvers on each call."""
    _, _, gauss_newton, _, _ = _levels()
    return [
        ("ij-solver-and-damping", dict(ij=CG(max_iter=40, tol=1e-13), damping=10.0),
         ImplicitJacobian(CG(max_iter=40, tol=1e-13), damping=10.0)),
        ("concatenated-head", dict(ij=MINRES(max_iter=60, tol=1e-13), damping=0.5,
                                   solve_over="all", head_damping=0.3),
         ImplicitJacobian(MINRES(max_iter=60, tol=1e-13), damping=0.5, solve_over="all",
                          head_damping=0.3)),
        ("subset-outside", dict(ij=Dense(), damping=1.0, ij_subset=["a"], ij_outside="zero"),
         ImplicitJacobian(Dense(), damping=1.0, subset=["a"], outside="zero")),
        ("products-and-policy", dict(ij=Dense(), hvp_mode="reverse-over-reverse",
                                     reuse_graph=False, on_breakdown="warn"),
         ImplicitJacobian(Dense(), hvp_mode="reverse-over-reverse", reuse_graph=False,
                          on_breakdown="warn")),
        ("gauss-newton", dict(ij=CG(max_iter=40, tol=1e-13), damping=2.0,
                              curvature=gauss_newton),
         ImplicitJacobian(CG(max_iter=40, tol=1e-13), damping=2.0, curvature=gauss_newton)),
        ("damping-only", dict(damping=3.0), ImplicitJacobian(damping=3.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bilevel_cases())),
                         ids=[c[0] for c in _bilevel_cases()])
def test_old_bilevel_keywords_give_the_new_spellings_hypergradient(case):
    upper_loss, pretext, _, upper, lower = _levels()
    _, old_kwargs, new_ij = _bilevel_cases()[case]
    with pytest.warns(DeprecationWarning, match=r"BilevelProblem.*ij=ImplicitJacobian\(") as rec:
        old = BilevelProblem(upper_loss, pretext, lam=0.2, regularizer=ProximalL2(["a", "b"]),
                             **old_kwargs)
    assert any(w.filename == __file__ for w in rec), "the warning points at the caller"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = BilevelProblem(upper_loss, pretext, lam=0.2, regularizer=ProximalL2(["a", "b"]),
                             ij=new_ij)
    assert old.ij == new.ij and type(old.solver) is type(new.solver)
    a = old.upper_grad(upper, lower, None, None)
    b = new.upper_grad(upper, lower, None, None)
    assert set(a.grads) == set(b.grads) == set(upper)
    for name in a.grads:
        assert a.grads[name].dtype == F64
        torch.testing.assert_close(a.grads[name], b.grads[name], rtol=1e-12, atol=1e-14)
    assert a.grads["a"].abs().max() > 0
    assert a.info.iterations == b.info.iterations


def test_a_bare_solver_as_ij_is_deprecated_but_the_default_is_not():
    upper_loss, pretext, _, _, _ = _levels()
    solver = CG(max_iter=3)
    with pytest.warns(DeprecationWarning, match=r"ImplicitJacobian\(solver=\.\.\.\)"):
        problem = BilevelProblem(upper_loss, pretext, lam=0.2, ij=solver)
    assert problem.ij == ImplicitJacobian(solver) and problem.solver is solver
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        default = BilevelProblem(upper_loss, pretext, lam=0.2)
    assert default.ij == ImplicitJacobian() and isinstance(default.solver, CG)


def test_mixing_an_implicit_jacobian_with_old_bilevel_keywords_is_a_type_error():
    upper_loss, pretext, _, _, _ = _levels()
    for old in (dict(damping=1.0), dict(solve_over="all"), dict(ij_subset=["a"]),
                dict(reuse_graph=False)):
        with pytest.raises(TypeError, match="not both"):
            BilevelProblem(upper_loss, pretext, lam=0.2, ij=ImplicitJacobian(CG()), **old)


def test_an_unknown_bilevel_keyword_is_a_type_error():
    upper_loss, pretext, _, _, _ = _levels()
    with pytest.raises(TypeError, match="unexpected keyword.*dampening"):
        BilevelProblem(upper_loss, pretext, lam=0.2, dampening=1.0)
    with pytest.raises(TypeError, match="unexpected keyword.*subset"):
        BilevelProblem(upper_loss, pretext, lam=0.2, ij=ImplicitJacobian(), subset=["a"])


# -- argmin --------------------------------------------------------------------------------------


def _inner():
    """``g(w, x) = mean((tanh(Z w) − t)²)·e^{s}/2 + ½‖w‖²·e^{r}``, solved to stationarity."""
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(15, 4, generator=g, dtype=F64), torch.randn(15, generator=g, dtype=F64)
    x0 = {"s": torch.tensor(0.3, dtype=F64), "r": torch.tensor(-0.5, dtype=F64)}

    def outputs(y, x):
        return torch.tanh(z @ y["w"])

    def output_loss(o, x):
        return 0.5 * torch.exp(x["s"]) * ((o - t) ** 2).mean()

    def objective(y, x):
        return output_loss(outputs(y, x), x) + 0.5 * torch.exp(x["r"]) * (y["w"] ** 2).sum()

    w = torch.zeros(4, dtype=F64)
    for _ in range(30):  # Newton's method to ‖∇g‖ ≈ 0
        def of_w(v):
            return objective({"w": v}, x0)

        grad = torch.func.grad(of_w)(w)
        if grad.norm() < 1e-13:
            break
        w = w - torch.linalg.solve(torch.autograd.functional.hessian(of_w, w), grad)
    return objective, GaussNewton(outputs, output_loss), x0, {"w": w}


def _argmin_grads(**kwargs):
    objective, _, x0, y = _inner()
    x = {n: v.clone().requires_grad_(True) for n, v in x0.items()}
    w_star = argmin(objective, y, x, **kwargs)["w"]
    (torch.sin(w_star).sum() + w_star[0] ** 2).backward()
    return {n: v.grad for n, v in x.items()}


def _argmin_cases():
    _, gauss_newton, _, _ = _inner()
    return [
        ("solver", dict(solver=CG(max_iter=50, tol=1e-13)),
         ImplicitJacobian(CG(max_iter=50, tol=1e-13))),
        ("bare-solver-as-ij", dict(ij=MINRES(max_iter=50, tol=1e-13)),
         ImplicitJacobian(MINRES(max_iter=50, tol=1e-13))),
        ("damping", dict(solver=Dense(), damping=0.7), ImplicitJacobian(Dense(), damping=0.7)),
        ("products-and-policy", dict(solver=MINRES(max_iter=50, tol=1e-13), reuse_graph=False,
                                     hvp_mode="forward-over-reverse", on_breakdown="warn"),
         ImplicitJacobian(MINRES(max_iter=50, tol=1e-13), reuse_graph=False,
                          hvp_mode="forward-over-reverse", on_breakdown="warn")),
        ("gauss-newton", dict(solver=Dense(), curvature=gauss_newton),
         ImplicitJacobian(Dense(), curvature=gauss_newton)),
    ]


@pytest.mark.parametrize("case", range(len(_argmin_cases())),
                         ids=[c[0] for c in _argmin_cases()])
def test_old_argmin_keywords_give_the_new_spellings_hypergradient(case):
    _, old_kwargs, new_ij = _argmin_cases()[case]
    with pytest.warns(DeprecationWarning, match=r"argmin.*ij=ImplicitJacobian\(") as rec:
        old = _argmin_grads(**old_kwargs)
    assert any(w.filename == __file__ for w in rec), "the warning points at the caller"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = _argmin_grads(ij=new_ij)
    for name in ("s", "r"):
        assert old[name].dtype == F64 and old[name].abs() > 0
        torch.testing.assert_close(old[name], new[name], rtol=1e-12, atol=1e-14)


def test_mixing_or_unknown_argmin_keywords_are_type_errors():
    objective, _, x0, y = _inner()
    x = {n: v.clone().requires_grad_(True) for n, v in x0.items()}
    with pytest.raises(TypeError, match="not both"):
        argmin(objective, y, x, ij=ImplicitJacobian(Dense()), damping=0.1)
    with pytest.raises(TypeError, match="not both"):
        argmin(objective, y, x, ij=ImplicitJacobian(), solver=Dense())
    with pytest.raises(TypeError, match="unexpected keyword.*tol"):
        argmin(objective, y, x, tol=1e-6)
    # Keywords BilevelProblem took but argmin never did are unknown here too.
    for bilevel_only in ("solve_over", "head_damping", "ij_subset", "ij_outside"):
        with pytest.raises(TypeError, match=f"unexpected keyword.*{bilevel_only}"):
            argmin(objective, y, x, **{bilevel_only: None})


# -- old module paths ----------------------------------------------------------------------------

#: ``__all__`` of each module that moved, as of commit 4115803 (the last release's layout).
OLD_MODULES = {
    "hessian": ["HVPMode", "HVPModeError", "HessianOperator", "functional_module", "hvp",
                "in_hvp"],
    "gauss_newton": ["GaussNewton", "GaussNewtonOperator"],
    "nystrom": ["LowRank", "NystromPreconditioner", "NystromSolver", "nystrom_approximation"],
    "mfac": ["MFAC", "GradientWindow", "load_solver_state", "observe_lower_gradient",
             "solver_state"],
    "system": ["IJSystem"],
    "schedules": ["ConstantSchedule", "CosineDecay", "CosineIncrease", "ExponentialIncrease",
                  "LambdaSchedule", "LearnableLambda", "as_lambda"],
    "gradients": ["LAM_RHO", "LowerGradient", "NonFiniteError", "UpperGradient", "assign_grads"],
    "regularizer_sum": ["SumRegularizer"],
    "checkpoint": ["CheckpointError", "load_checkpoint", "save_checkpoint"],
    "distributed": ["AllReduceMean", "broadcast_from_main", "is_main_process", "rank",
                    "world_size"],
    "sync_batchnorm": ["SyncBatchNorm", "convert_sync_batchnorm"],
    "optim": ["LARS", "lars_param_groups"],
    "batch_stack": ["BatchStack", "to_device"],
    "bissl_objective": ["bissl_upper_loss"],
    "run_state": ["RunState", "gather_per_rank", "rng_state", "save_on_main", "set_rng_state"],
    "run_log": ["progress_bar", "rewrite_log"],
}

#: The M-FAC trainer helpers gave way to the solver protocol: they are functions of the old module
#: itself that warn when called (tested below), not names re-exported from a new home.
MFAC_HELPERS = ("load_solver_state", "observe_lower_gradient", "solver_state")

_MOVED = [(module, name) for module, names in OLD_MODULES.items() for name in names
          if not (module == "mfac" and name in MFAC_HELPERS)]


@pytest.mark.parametrize("module, name", _MOVED, ids=[f"{m}.{n}" for m, n in _MOVED])
def test_every_old_module_path_gives_its_names_with_a_deprecation_warning(module, name):
    old = importlib.import_module(f"implicitbilevel.{module}")
    with pytest.warns(DeprecationWarning, match=rf"implicitbilevel\.{module} is deprecated") as rec:
        value = getattr(old, name)
    advice = re.search(rf"import {name} from ([\w.]+)", str(rec[0].message))
    assert advice, str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new_home = importlib.import_module(advice.group(1))
        assert getattr(new_home, name) is value  # the advice is right and the new home is quiet
    assert rec[0].filename == __file__, "the warning points at the caller"


def test_from_import_of_an_old_module_path_warns():
    with pytest.warns(DeprecationWarning, match="implicitbilevel.hessian is deprecated"):
        from implicitbilevel.hessian import HessianOperator
    assert HessianOperator is implicitbilevel.HessianOperator
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        importlib.import_module("implicitbilevel.schedules").not_a_name  # noqa: B018


def test_the_old_mfac_trainer_helpers_warn_and_still_work():
    from implicitbilevel import mfac as old_mfac

    upper_loss, pretext, _, upper, lower = _levels()
    problem = BilevelProblem(upper_loss, pretext, lam=0.2, regularizer=ProximalL2(["a", "b"]),
                             ij=ImplicitJacobian(MFAC(m=2), damping=1.0, reuse_graph=False))
    gradient = problem.lower_grad(upper, lower, None)
    with pytest.warns(DeprecationWarning, match="observe_lower_gradient is deprecated"):
        old_mfac.observe_lower_gradient(problem, upper, lower, gradient)
    assert problem.solver.window.count == 1
    with pytest.warns(DeprecationWarning, match="solver_state is deprecated"):
        state = old_mfac.solver_state(problem.solver)
    assert set(state) == {"ij"}
    fresh = MFAC(m=2)
    with pytest.warns(DeprecationWarning, match="load_solver_state is deprecated"):
        old_mfac.load_solver_state(fresh, state)
    assert fresh.window.count == 1
    assert torch.equal(fresh.window.buffer["a"], problem.solver.window.buffer["a"])
    with pytest.warns(DeprecationWarning, match="solver_state is deprecated"):
        assert old_mfac.solver_state(CG()) == {}  # nothing to checkpoint


# -- the package's names -------------------------------------------------------------------------

#: ``implicitbilevel.__all__`` and ``implicitbilevel.bissl.__all__`` as of commit 4115803.
PACKAGE_ALL = [
    "CG", "ArgminSolve", "BaseRegularizer", "BilevelProblem", "ConstantSchedule", "CosineDecay",
    "CosineIncrease", "Dense", "ExponentialIncrease", "GaussNewton", "GaussNewtonOperator",
    "GradientWindow", "HVPMode", "HVPModeError", "HessianOperator", "IJSubset", "IJSystem",
    "LambdaSchedule", "LearnableLambda", "LinearSolver", "LowRank", "LowerGradient", "MFAC",
    "MINRES", "Neumann", "NonFiniteError", "NystromPreconditioner", "NystromSolver", "Params",
    "ProximalL2", "Regularizer", "SolveInfo", "SolverBreakdownError", "SumRegularizer",
    "UpperGradient", "argmin", "assign_grads", "functional_module", "hvp", "in_hvp",
    "nystrom_approximation",
]
BISSL_ALL = ["BatchStack", "BiSSLConfig", "BiSSLTrainer", "bissl_upper_loss"]


@pytest.mark.parametrize("package, names", [(implicitbilevel, PACKAGE_ALL),
                                            (implicitbilevel.bissl, BISSL_ALL)],
                         ids=["implicitbilevel", "implicitbilevel.bissl"])
def test_every_name_the_package_exported_still_imports_from_it(package, names):
    missing = [n for n in names if n not in package.__all__]
    assert not missing, f"{package.__name__}.__all__ lost {missing}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in names:
            assert getattr(package, name) is not None, name
        namespace: dict = {}
        exec(f"from {package.__name__} import *", namespace)
    assert set(names) <= set(namespace)


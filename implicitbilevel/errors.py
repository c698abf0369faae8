"""Every exception the library raises of its own, in one leaf module that imports nothing from the
package, so any module can raise any of them without an import circle.

==============================  ===========================================================
exception                       raised when
==============================  ===========================================================
:class:`NonFiniteError`         a loss, gradient, product or solution is NaN or infinite
:class:`SolverBreakdownError`   a linear solve broke down (``on_breakdown="raise"``)
:class:`HVPModeError`           a curvature-product mode cannot run on the given model
:class:`CheckpointError`        a checkpoint is missing, truncated, corrupt or of another format
==============================  ===========================================================
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointError", "HVPModeError", "NonFiniteError", "SolverBreakdownError"]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> problem = ib.BilevelProblem(lambda x, y, b: (y["w"] ** 2).sum(),
        ...                             lambda y, b: (y["w"].log() ** 2).sum(), lam=1.0)
        >>> x = {"w": torch.zeros(1, requires_grad=True)}
        >>> y = {"w": torch.tensor([-1.0], requires_grad=True)}           # log(-1) is NaN
        >>> try:
        ...     problem.lower_grad(x, y, batch=None)
        ... except ib.NonFiniteError as err:
        ...     print(type(err).__name__, issubclass(ib.NonFiniteError, FloatingPointError))
        NonFiniteError True
    """


class SolverBreakdownError(RuntimeError):
    """A linear solve broke down; ``info`` holds its diagnostics
    (a :class:`~implicitbilevel.SolveInfo`).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> x = {"a": torch.tensor(1.0, dtype=torch.float64, requires_grad=True)}
        >>> def g(y, x):                          # a saddle: Hessian diag(1, -1), indefinite
        ...     return 0.5 * y["w"][0] ** 2 - 0.5 * y["w"][1] ** 2 - x["a"] * y["w"].sum()
        >>> y = ib.argmin(g, {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}, x,
        ...               ij=ib.ImplicitJacobian(ib.CG(max_iter=5)))
        >>> try:                                          # CG meets d^T A d = 0 on [1, 1]
        ...     y["w"].sum().backward()
        ... except ib.SolverBreakdownError as err:
        ...     print(err.info.breakdown is not None)
        True
    """

    def __init__(self, message: str, info: Any) -> None:
        super().__init__(message)
        self.info = info


class HVPModeError(RuntimeError):
    """An HVP mode was requested that the loss's operations cannot run.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> class Square(torch.autograd.Function):      # a Function without a forward-mode rule
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x * g
        >>> w = {"w": torch.tensor([1.0, 3.0], dtype=torch.float64)}
        >>> f = lambda p: Square.apply(p["w"]).sum()
        >>> try:
        ...     ib.hvp(f, w, w, mode="forward-over-reverse")
        ... except ib.HVPModeError:
        ...     print("no forward-mode rule")
        no forward-mode rule
        >>> ib.hvp(f, w, w, mode="reverse-over-reverse")["w"].tolist()   # the Hessian is 2 I
        [2.0, 6.0]
    """


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unexpected format.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import implicitbilevel as ib
        >>> from implicitbilevel.bissl.checkpoint import load_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "state.pt"
        ...     _ = path.write_bytes(b"not a checkpoint")           # a truncated or foreign file
        ...     try:
        ...         load_checkpoint(path)
        ...     except ib.CheckpointError:
        ...         print("refused")
        refused
    """

"""BiSSL training (thesis Algorithm 2) on a :class:`~implicitbilevel.BilevelProblem`: the loop and
what it needs to run for days on shared machines.

- ``trainer`` and ``config``: :class:`BiSSLTrainer` and :class:`BiSSLConfig`, the
  alternations of ``N_L`` lower and ``N_U`` upper steps with clipping, schedules, λ stepping,
  logging and exact resume;
- ``objective``: :func:`bissl_upper_loss`, the upper objective
  ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` (eq. 4.4);
- ``batch_stack``: :class:`BatchStack`, each level's stack of batches
  (Sec. 6.1.3);
- ``run_state``, ``run_log`` and
  :mod:`~implicitbilevel.bissl.checkpoint`: the run state behind a checkpoint, the metrics log and
  atomic checkpoint files that load safely;
- :mod:`~implicitbilevel.bissl.lars`: LARS, the thesis's pretext and lower-level optimiser.
"""

from .batch_stack import BatchStack
from .config import BiSSLConfig
from .objective import bissl_upper_loss
from .trainer import BiSSLTrainer

__all__ = ["BatchStack", "BiSSLConfig", "BiSSLTrainer", "bissl_upper_loss"]

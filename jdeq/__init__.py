"""jdeq: deep equilibrium models in JAX.

The core (this namespace) is pure JAX: fixed-point solvers, the differentiable
equilibrium with its gradient modes, fixed-point correction (differentiable states
of one solve, :func:`fixed_point_states`, and their weighted loss,
:func:`correction_loss`), and Jacobian diagnostics. Flax modules live in
:mod:`jdeq.nn` and :mod:`jdeq.models`, input pipelines in :mod:`jdeq.data`, training
in :mod:`jdeq.train`, experiments (model + data + training) in :mod:`jdeq.experiment`.

Besides the solvers and gradient modes, the core exports the toolkit every jdeq
configuration is built with (:func:`config`, :func:`require`,
:func:`require_choice`, :func:`require_positive`) and the per-sample reductions of
batched pytrees (:func:`per_sample_sum`, :func:`per_sample_dot`,
:func:`per_sample_norm`).
"""

from jdeq._src.batched_tree import per_sample_dot, per_sample_norm, per_sample_sum
from jdeq._src.config import config, require, require_choice, require_positive
from jdeq._src.correction import correction_indices, correction_loss, fixed_point_states
from jdeq._src.fixed_point import fixed_point
from jdeq._src.gradients import (IFT, JFB, BackwardSolver, GradientMode, Krylov, Phantom,
                                 Unrolled)
from jdeq._src.regularizers import jacobian_fro_sq, spectral_radius
from jdeq._src.solvers.anderson import Anderson
from jdeq._src.solvers.base import AbstractSolver
from jdeq._src.solvers.broyden import Broyden
from jdeq._src.solvers.fixed_point_iteration import FixedPointIteration
from jdeq._src.stats import SolverStats, backward_stats, backward_stats_probe

__version__ = "0.1.0"

__all__ = (
    "AbstractSolver", "Anderson", "BackwardSolver", "Broyden", "FixedPointIteration",
    "GradientMode", "IFT", "JFB", "Krylov", "Phantom", "SolverStats", "Unrolled",
    "backward_stats", "backward_stats_probe", "config", "correction_indices",
    "correction_loss", "fixed_point", "fixed_point_states",
    "jacobian_fro_sq", "per_sample_dot", "per_sample_norm", "per_sample_sum",
    "require", "require_choice", "require_positive", "spectral_radius",
)

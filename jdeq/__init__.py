"""jdeq: deep equilibrium models in JAX.

The core (this namespace) is pure JAX: fixed-point solvers, the differentiable
equilibrium with its gradient modes, and Jacobian diagnostics. Flax modules live in
:mod:`jdeq.nn` and :mod:`jdeq.models`, input pipelines in :mod:`jdeq.data`, training
in :mod:`jdeq.train`.
"""

from jdeq._src.fixed_point import fixed_point
from jdeq._src.gradients import IFT, JFB, Krylov, Phantom, Unrolled
from jdeq._src.regularizers import jacobian_fro_sq, spectral_radius
from jdeq._src.solvers.anderson import Anderson
from jdeq._src.solvers.base import AbstractSolver
from jdeq._src.solvers.broyden import Broyden
from jdeq._src.solvers.fixed_point_iteration import FixedPointIteration
from jdeq._src.stats import SolverStats, backward_stats, backward_stats_probe

__version__ = "0.1.0"

__all__ = (
    "AbstractSolver", "Anderson", "Broyden", "FixedPointIteration", "IFT", "JFB",
    "Krylov", "Phantom", "SolverStats", "Unrolled", "backward_stats",
    "backward_stats_probe", "fixed_point", "jacobian_fro_sq", "spectral_radius",
)

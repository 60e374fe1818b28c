"""How gradients pass through an equilibrium: configuration objects only."""

from __future__ import annotations

from typing import Union

from jdeq._src.config import config, require, require_choice, require_positive
from jdeq._src.solvers.anderson import Anderson
from jdeq._src.solvers.base import AbstractSolver


@config
class Krylov:
  """A Krylov method from jaxopt for the IFT linear system ``u (I − J) = v``.

  The system is block diagonal over samples; the Krylov method sees the whole batch
  as one vector (per-sample residuals are still reported). ``nstep`` in the backward
  statistics is then ``max_iter``, an upper bound, since jaxopt does not report it.

  Attributes:
    method: ``"gmres"`` (``jaxopt.linear_solve.solve_gmres``) or ``"normal_cg"``
      (``solve_normal_cg``: CG on the normal equations).
    max_iter: iteration limit.
    tol: relative tolerance.
    restart: GMRES restart length.
  """
  method: str = "gmres"
  max_iter: int = 50
  tol: float = 1e-6
  restart: int = 20

  def __post_init__(self) -> None:
    require_choice(self, "method", self.method, ("gmres", "normal_cg"))
    require(isinstance(self.max_iter, int) and self.max_iter >= 1, self,
            f"max_iter must be an integer >= 1, got {self.max_iter!r}")
    require_positive(self, tol=self.tol, restart=self.restart)


BackwardSolver = Union[AbstractSolver, Krylov]


@config
class IFT:
  """Implicit differentiation: gradients from the linear fixed point at ``z*``.

  Reverse mode solves ``u = u J + ∂ℓ/∂z*`` and returns ``u ∂f/∂θ``; forward mode
  solves ``ż = J ż + (∂f/∂θ) θ̇``. Memory does not grow with the forward iterations.

  Attributes:
    solver: the backward solver, any fixed-point solver (with its own budget and
      tolerance, applied to the linear map) or a :class:`Krylov` method.
  """
  solver: BackwardSolver = Anderson(max_iter=30, tol=1e-6, stop_mode="abs")

  def __post_init__(self) -> None:
    require(isinstance(self.solver, (AbstractSolver, Krylov)), self,
            f"solver must be a fixed-point solver or Krylov, got {self.solver!r}")


@config
class Phantom:
  """Phantom gradients (Geng et al., 2021): differentiate ``k`` damped steps from ``z*``.

  With ``h₀ = stop_gradient(z*)`` and ``h ← (1 − λ) h + λ f(h)``, the output is ``h_k``
  and gradients flow through those ``k`` steps only. With ``neumann=True`` each step
  uses the Jacobian at ``z*`` instead of at ``h_s``, so the gradient is the truncated
  Neumann series ``λ Σ_{s<k} ((1 − λ) I + λ J)^s ∂f/∂θ``.

  Attributes:
    k: number of differentiated steps.
    damping: ``λ ∈ (0, 1]``.
    neumann: use the Neumann-series variant.
    unroll: how the ``k`` steps are written into the program (see
      :class:`Unrolled`); changes speed and compile time only, never values.
  """
  k: int = 5
  damping: float = 0.5
  neumann: bool = False
  unroll: Union[bool, int] = 32

  def __post_init__(self) -> None:
    require(isinstance(self.k, int) and self.k >= 1, self,
            f"k must be an integer >= 1, got {self.k!r}")
    require(0 < self.damping <= 1, self,
            f"damping must be in (0, 1], got {self.damping!r}")
    _check_unroll(self, self.unroll)


@config
class JFB:
  """Jacobian-free backprop / one-step gradient: the output is ``f(stop_gradient(z*))``."""


@config
class Unrolled:
  """Plain backpropagation through ``steps`` iterations ``z ← f(z)`` from ``z0``.

  No solver runs; memory grows linearly with ``steps``. This is MDEQ's
  "pretraining" mode and the baseline the implicit modes are compared with.

  Attributes:
    steps: number of iterations.
    unroll: how the iterations are written into the program, as
      ``jax.lax.scan``'s ``unroll``: an integer ``u`` writes ``u`` steps out per
      loop iteration, and a loop of at most ``u`` steps completely, so XLA compiles
      their derivatives as top-level code (on XLA:CPU, convolution derivatives
      inside loops run slower; ``docs/benchmarks.md``). The default 32 writes out
      every depth MDEQ pretrains with; ``True`` writes out any ``steps``; ``1`` (or
      ``False``) keeps a rolled loop, whose compile time does not grow with
      ``steps``. Speed, memory layout and compile time only: the values are the same.
  """
  steps: int = 10
  unroll: Union[bool, int] = 32

  def __post_init__(self) -> None:
    require(isinstance(self.steps, int) and self.steps >= 1, self,
            f"steps must be an integer >= 1, got {self.steps!r}")
    _check_unroll(self, self.unroll)


def _check_unroll(owner, unroll) -> None:
  require(isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1), owner,
          f"unroll must be True, False or an integer >= 1, got {unroll!r}")


GradientMode = Union[IFT, Phantom, JFB, Unrolled]

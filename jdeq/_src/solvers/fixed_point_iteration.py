"""Damped fixed-point (Picard) iteration."""

from __future__ import annotations

import jax

from jdeq._src.config import config, require
from jdeq._src.solvers.base import AbstractSolver


@config
class FixedPointIteration(AbstractSolver):
  """``z ← (1 − λ) z + λ f(z)``, i.e. ``z ← z + λ g(z)``.

  Converges linearly with rate ``ρ((1 − λ) I + λ J)`` near a fixed point.

  Attributes:
    damping: ``λ ∈ (0, 1]``; 1 is the plain iteration.
  """
  damping: float = 1.0

  def __post_init__(self) -> None:
    super().__post_init__()
    require(0 < self.damping <= 1, self,
            f"damping must be in (0, 1], got {self.damping!r}")

  def init(self, z: jax.Array, g: jax.Array) -> tuple:
    return ()

  def propose(self, state: tuple, z: jax.Array, g: jax.Array):
    return z + self.damping * g, state

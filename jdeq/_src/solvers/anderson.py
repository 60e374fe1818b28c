"""Anderson acceleration (type II) with a per-sample, always-solvable mixing problem."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdeq._src.config import config, require, require_positive
from jdeq._src.small_linalg import solve_spd
from jdeq._src.solvers.base import AbstractSolver


class AndersonState(NamedTuple):
  values: jax.Array     # (B, m, D) the map values f(x_i) of the last m iterates
  residuals: jax.Array  # (B, m, D) their residuals g_i = f(x_i) − x_i
  gram: jax.Array       # (B, m, m) g_i · g_j, updated one row per step
  count: jax.Array      # number of proposals made so far


@config
class Anderson(AbstractSolver):
  """Anderson acceleration over the last ``m`` iterates.

  Each step picks mixing weights ``α`` over the history by the regularized
  least-squares problem

    min_α ‖Σᵢ αᵢ gᵢ‖² + ridge · s · ‖α‖²   subject to   Σᵢ αᵢ = 1,

  whose solution is ``α = w / Σw`` with ``(GGᵀ / s + ridge · I) w = 1``, and moves to
  ``z ← Σᵢ αᵢ (xᵢ + β gᵢ) = Σᵢ αᵢ (f(xᵢ) − (1 − β) gᵢ)``. The scale ``s`` is the largest ``‖gᵢ‖²`` of the history,
  so the ridge is relative and the system stays well conditioned at any residual
  scale (the reference uses an absolute ridge, which is scale dependent and fails on
  singular histories). If the weights are still not finite, the step falls back to
  a plain fixed-point step for that sample: failure never becomes NaN.

  Attributes:
    m: history size.
    ridge: relative Tikhonov regularization of the mixing problem.
    beta: mixing parameter; 1 uses the map values ``f(xᵢ)`` only.
  """
  m: int = 5
  ridge: float = 1e-4
  beta: float = 1.0

  def __post_init__(self) -> None:
    super().__post_init__()
    require(isinstance(self.m, int) and self.m >= 1, self,
            f"m must be an integer >= 1, got {self.m!r}")
    require_positive(self, ridge=self.ridge, beta=self.beta)

  def init(self, z: jax.Array, g: jax.Array) -> AndersonState:
    batch, dim = z.shape
    return AndersonState(
        values=jnp.zeros((batch, self.m, dim), z.dtype),
        residuals=jnp.zeros((batch, self.m, dim), z.dtype),
        gram=jnp.zeros((batch, self.m, self.m), z.dtype),
        count=jnp.asarray(0, jnp.int32))

  def propose(self, state: AndersonState, z: jax.Array, g: jax.Array):
    slot = state.count % self.m
    # In-place slot writes; `.at[].set` would wrap each in a bounds check.
    zero = jnp.zeros_like(slot)
    values = jax.lax.dynamic_update_slice(state.values, (z + g)[:, None], (zero, slot, zero))
    residuals = jax.lax.dynamic_update_slice(state.residuals, g[:, None], (zero, slot, zero))
    new_row = jnp.einsum("bd,bjd->bj", g, residuals)
    gram = state.gram.at[:, slot, :].set(new_row).at[:, :, slot].set(new_row)

    valid = jnp.arange(self.m) < jnp.minimum(state.count + 1, self.m)
    weights = _mixing_weights(gram, valid, self.ridge)
    fallback = jax.nn.one_hot(slot, self.m, dtype=z.dtype)
    usable = jnp.all(jnp.isfinite(weights), axis=1, keepdims=True)
    weights = jnp.where(usable, weights, fallback[None, :])

    proposal = jnp.einsum("bi,bid->bd", weights, values)
    if self.beta != 1.0:  # static: the default β = 1 needs one contraction, not two
      proposal -= (1.0 - self.beta) * jnp.einsum("bi,bid->bd", weights, residuals)
    return proposal, AndersonState(values, residuals, gram, state.count + 1)


def _mixing_weights(gram: jax.Array, valid: jax.Array, ridge: float) -> jax.Array:
  """Solves the constrained least-squares mixing problem for each sample.

  Invalid (not yet filled) history slots get an identity row and a zero right-hand
  side, so their weight is exactly zero and every system has the static size m.
  """
  m = gram.shape[-1]
  eye = jnp.eye(m, dtype=gram.dtype)
  pair_valid = valid[:, None] & valid[None, :]
  diagonal = jnp.where(valid, jnp.diagonal(gram, axis1=1, axis2=2), 0.0)
  scale = jnp.max(diagonal, axis=1) + jnp.finfo(gram.dtype).tiny
  system = gram / scale[:, None, None] + ridge * eye
  system = jnp.where(pair_valid, system, eye)
  rhs = jnp.broadcast_to(valid.astype(gram.dtype), gram.shape[:2])
  w = solve_spd(system, rhs)
  return w / jnp.sum(w, axis=1, keepdims=True)

"""Limited-memory ("good") Broyden's method on g(z) = f(z) − z."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdeq._src.batched_tree import per_sample_dot, per_sample_norm
from jdeq._src.config import config, require
from jdeq._src.solvers.base import AbstractSolver


class BroydenState(NamedTuple):
  us: jax.Array        # (B, memory, D)
  vs: jax.Array        # (B, memory, D); H = −I + Σᵢ live ᵢ uᵢ vᵢᵀ, once pending is in
  live: jax.Array      # (memory,) 1 for the pairs of the current estimate, else 0
  previous_z: jax.Array
  previous_g: jax.Array
  previous_hg: jax.Array  # H g at the previous iterate, with the H that stepped from it
  count: jax.Array
  pending_u: jax.Array  # (B, D): the newest pair, written into slot pending_slot
  pending_v: jax.Array  # of us/vs at the start of the next step
  pending_slot: jax.Array


@config
class Broyden(AbstractSolver):
  """Quasi-Newton root finding with a low-rank inverse-Jacobian estimate.

  ``H ≈ (∂g/∂z)⁻¹`` starts at ``−I`` (so the first step is ``z₁ = f(z₀)``) and after
  each step, with ``s = Δz`` and ``y = Δg``, takes the good-Broyden update

    H ← H + (s − H y) (sᵀ H) / (sᵀ H y),

  stored as the rank-one pairs ``(uᵢ, vᵢ)`` of ``H = −I + Σ uᵢ vᵢᵀ``; the step is
  ``z ← z − H g``. At most ``memory`` pairs are kept; when full, ``H`` restarts from
  ``−I``.
  An update whose denominator vanishes is skipped for that sample.

  Attributes:
    memory: number of rank-one pairs kept.
  """
  memory: int = 30

  def __post_init__(self) -> None:
    super().__post_init__()
    require(isinstance(self.memory, int) and self.memory >= 1, self,
            f"memory must be an integer >= 1, got {self.memory!r}")

  def init(self, z: jax.Array, g: jax.Array) -> BroydenState:
    batch, dim = z.shape
    zeros = jnp.zeros((batch, self.memory, dim), z.dtype)
    live = jnp.zeros((self.memory,), z.dtype)
    no_pair = jnp.zeros_like(z)
    first = jnp.asarray(0, jnp.int32)
    return BroydenState(zeros, zeros, live, z, g, -g, first, no_pair, no_pair, first)

  def propose(self, state: BroydenState, z: jax.Array, g: jax.Array):
    # The previous step's pair is written first, before this step reads the buffers:
    # written after the reads, XLA:CPU copies a whole (B, memory, D) buffer each step
    # to keep the old values for them.
    us = jax.lax.dynamic_update_index_in_dim(state.us, state.pending_u,
                                             state.pending_slot, 1)
    vs = jax.lax.dynamic_update_index_in_dim(state.vs, state.pending_v,
                                             state.pending_slot, 1)
    # Two low-rank products per step instead of three: H y = H g − H g_prev reuses
    # the previous step's H g_prev, and the updated H' g = H g + u (vᵀ g).
    s = z - state.previous_z
    h_g = _apply_inverse(us, vs, state.live, g)
    h_y = h_g - state.previous_hg
    s_h = _apply_inverse(vs, us, state.live, s)  # sᵀH, transposed factors
    denominator = per_sample_dot(s, h_y)
    size = per_sample_norm(s) * per_sample_norm(h_y)
    usable = (jnp.abs(denominator) > 1e-6 * size) & (size > 0)
    safe = jnp.where(usable, denominator, 1.0)
    u = jnp.where(usable[:, None], (s - h_y) / safe[:, None], 0.0)
    v = jnp.where(usable[:, None], s_h, 0.0)
    # The first call has s = 0 and stores nothing. When the memory is full the
    # estimate restarts from −I: dropping only the oldest pair would leave the others
    # inconsistent (each was computed through its predecessors) and can diverge.
    # Pairs are retired through the `live` mask so the buffers update in place.
    slot = jnp.maximum(state.count - 1, 0) % self.memory
    restart = (slot == 0) & (state.count > 1)
    live = jnp.where(restart, jnp.zeros_like(state.live), state.live).at[slot].set(1.0)
    new_h_g = (jnp.where(restart, -g, h_g)
               + u * per_sample_dot(v, g)[:, None])
    proposal = z - new_h_g
    return proposal, BroydenState(us, vs, live, z, g, new_h_g, state.count + 1,
                                  u, v, slot)


def _apply_inverse(us: jax.Array, vs: jax.Array, live: jax.Array,
                   x: jax.Array) -> jax.Array:
  """``(−I + Σᵢ liveᵢ uᵢ vᵢᵀ) x`` per sample."""
  coefficients = jnp.einsum("bid,bd->bi", vs, x) * live
  return -x + jnp.einsum("bid,bi->bd", us, coefficients)

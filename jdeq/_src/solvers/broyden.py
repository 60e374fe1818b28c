"""Limited-memory ("good") Broyden's method on g(z) = f(z) − z."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdeq._src.batched_tree import per_sample_dot, per_sample_norm
from jdeq._src.config import config, require
from jdeq._src.solvers.base import AbstractSolver


class BroydenState(NamedTuple):
  # H = −I + Σᵢ liveᵢ uᵢ vᵢᵀ, once the pending pair is in. The pairs live in
  # memory slots 0…memory−1, stored as consecutive blocks of slots (_blocks).
  us: tuple[jax.Array, ...]  # per block (B, slots in the block, D)
  vs: tuple[jax.Array, ...]
  live: jax.Array      # (memory,) 1 for the pairs of the current estimate, else 0
  previous_z: jax.Array
  previous_g: jax.Array
  previous_hg: jax.Array  # H g at the previous iterate, with the H that stepped from it
  count: jax.Array
  pending_u: jax.Array  # (B, D): the newest pair, written into slot pending_slot
  pending_v: jax.Array  # at the start of the next step
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
  An update whose denominator vanishes is skipped for that sample. Each step reads
  only the buffer blocks that hold live pairs (on XLA:CPU, where these memory-bound
  products dominate the solver's cost; see ``_blocks``).

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
    zeros = tuple(jnp.zeros((batch, size, dim), z.dtype)
                  for _, size in _blocks(self.memory, batch * dim * z.dtype.itemsize))
    live = jnp.zeros((self.memory,), z.dtype)
    no_pair = jnp.zeros_like(z)
    first = jnp.asarray(0, jnp.int32)
    return BroydenState(zeros, zeros, live, z, g, -g, first, no_pair, no_pair, first)

  def propose(self, state: BroydenState, z: jax.Array, g: jax.Array):
    # Two low-rank products per step instead of three: H y = H g − H g_prev reuses
    # the previous step's H g_prev, and the updated H' g = H g + u (vᵀ g).
    s = z - state.previous_z
    us, vs, h_g, s_h = _write_pending_and_apply(state, g, s)
    h_y = h_g - state.previous_hg
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


# Slots per block of the pair buffers on XLA:CPU. The low-rank products of large
# buffers are memory-bound there; they read only the blocks that hold live pairs,
# and a block of a few slots is as fast per byte as a whole buffer, where a slice of
# one (B, memory, D) array would be copied first. At most _MAX_BLOCKS blocks.
_BLOCK_SLOTS = 4
_MAX_BLOCKS = 8
# Below this many bytes per buffer (cache-sized), one block: the conditionals of
# the blocked form would cost more than the reads they save.
_BLOCKED_BUFFER_BYTES = 4 * 2**20


def _blocks(memory: int, slot_bytes: int) -> tuple[tuple[int, int], ...]:
  """``(first slot, slots)`` of each block, covering ``0…memory−1`` in order.

  One block for small buffers, and on accelerators: their memory bandwidth makes
  reading the unused slots cheap, while each ``lax.cond`` of the blocked form would
  cost them a transfer of its predicate to the host per step. Decided at trace
  time; speed only.
  """
  if jax.default_backend() != "cpu" or memory * slot_bytes < _BLOCKED_BUFFER_BYTES:
    return ((0, memory),)
  size = max(_BLOCK_SLOTS, -(-memory // _MAX_BLOCKS))
  return tuple((start, min(size, memory - start)) for start in range(0, memory, size))


def _write_pending_and_apply(state: BroydenState, g: jax.Array, s: jax.Array):
  """Writes the pending pair into its slot, then returns ``(us, vs, H g, Hᵀ s)``.

  The pair is written before the buffers are read: written after the reads, XLA:CPU
  copies a whole buffer each step to keep the old values for them. The live pairs
  fill the slots from slot 0 (a restart empties them all), so with several blocks
  ``H`` is applied from the blocks that hold live slots alone (one ``lax.switch``
  branch per count of such blocks, reading them only), and the pair is written in
  place by one ``lax.cond`` per block (a branch that returned every block would
  copy the ones it leaves alone).
  """
  starts = np.cumsum([0] + [u.shape[1] for u in state.us[:-1]])
  blocks = tuple((int(start), u.shape[1]) for start, u in zip(starts, state.us))

  def write(u, v, start):
    offset = state.pending_slot - start
    return (jax.lax.dynamic_update_index_in_dim(u, state.pending_u, offset, 1),
            jax.lax.dynamic_update_index_in_dim(v, state.pending_v, offset, 1))

  def apply(used, us, vs):
    h_g, s_h = -g, -s
    for (start, size), u, v in zip(blocks[:used], us, vs):
      alive = state.live[start:start + size]
      h_g = h_g + _low_rank(u, v, alive, g)
      s_h = s_h + _low_rank(v, u, alive, s)  # sᵀH: the transposed factors
    return h_g, s_h

  if len(blocks) == 1:
    u, v = write(state.us[0], state.vs[0], 0)
    return (u,), (v,), *apply(1, (u,), (v,))

  us, vs = list(state.us), list(state.vs)
  for j, (start, size) in enumerate(blocks):
    offset = state.pending_slot - start
    us[j], vs[j] = jax.lax.cond((offset >= 0) & (offset < size),
                                lambda u, v, start=start: write(u, v, start),
                                lambda u, v: (u, v), us[j], vs[j])
  us, vs = tuple(us), tuple(vs)
  filled = jnp.sum(state.live > 0).astype(jnp.int32)
  ends = jnp.asarray([start + size for start, size in blocks], jnp.int32)
  # Branch 0: nothing live yet (the first step); branch n: blocks 0…n−1 are read.
  branch = jnp.where(filled > 0, jnp.searchsorted(ends, filled) + 1, 0)
  branches = [lambda us, vs, n=n: apply(n, us, vs) for n in range(len(blocks) + 1)]
  return us, vs, *jax.lax.switch(branch, branches, us, vs)


def _low_rank(us: jax.Array, vs: jax.Array, live: jax.Array, x: jax.Array) -> jax.Array:
  """``Σᵢ liveᵢ uᵢ (vᵢᵀ x)`` per sample."""
  coefficients = jnp.einsum("bid,bd->bi", vs, x) * live
  return jnp.einsum("bid,bi->bd", us, coefficients)

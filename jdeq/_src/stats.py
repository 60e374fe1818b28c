"""Per-sample statistics of an equilibrium solve."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SolverStats(NamedTuple):
  """What a solve did, per sample (every field has leading axis ``B``).

  Attributes:
    nstep: int32, evaluations of the map spent on the sample until it stopped
      (converged, diverged, or the budget ran out).
    abs_residual: ``‖f(z) − z‖₂`` at the returned iterate.
    rel_residual: ``‖f(z) − z‖₂ / ‖f(z)‖₂`` at the returned iterate.
    converged: bool, the stop-mode residual reached the tolerance.
    diverged: bool, the iteration produced a non-finite value, its stop-mode
      residual exploded, or its iterate or absolute residual grew far beyond
      their initial scale, whatever the stop mode (see
      :class:`jdeq.AbstractSolver`'s ``divergence_ratio``); the sample's best
      finite iterate is returned.
    trace: ``(B, T)`` stop-mode residual after each evaluation, ``T = max_iter``
      when the solver records traces (``record_trace=True``), else ``T = 0``.
      Entries after a sample stopped repeat its last residual.
  """
  nstep: jax.Array
  abs_residual: jax.Array
  rel_residual: jax.Array
  converged: jax.Array
  diverged: jax.Array
  trace: jax.Array


PROBE_FIELDS = ("nstep", "abs_residual", "rel_residual", "converged", "diverged")


def backward_stats_probe(batch_size: int, dtype=jnp.float32) -> jax.Array:
  """A zero array whose gradient through :func:`jdeq.fixed_point` is the backward stats.

  Pass it as ``fixed_point(..., backward_probe=probe)`` and differentiate with respect
  to it as well; :func:`backward_stats` turns that gradient into a
  :class:`SolverStats` of the IFT backward (adjoint) solve. Under ``jax.jvp`` its
  tangent output carries the statistics of the tangent solve the same way.
  """
  return jnp.zeros((batch_size, len(PROBE_FIELDS)), dtype)


def stats_to_probe(stats: SolverStats, dtype) -> jax.Array:
  """Packs the per-sample fields of ``stats`` into a ``(B, 5)`` float array."""
  return jnp.stack([getattr(stats, name).astype(dtype) for name in PROBE_FIELDS], 1)


def backward_stats(probe_gradient: jax.Array) -> SolverStats:
  """Unpacks the gradient of a :func:`backward_stats_probe` into SolverStats."""
  columns = dict(zip(PROBE_FIELDS, jnp.moveaxis(probe_gradient, -1, 0)))
  batch = probe_gradient.shape[:-1]
  return SolverStats(
      nstep=jnp.round(columns["nstep"]).astype(jnp.int32),
      abs_residual=columns["abs_residual"],
      rel_residual=columns["rel_residual"],
      converged=columns["converged"] > 0.5,
      diverged=columns["diverged"] > 0.5,
      trace=jnp.zeros(batch + (0,), probe_gradient.dtype))

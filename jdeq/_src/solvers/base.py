"""The common driver of every fixed-point solver.

A solver only says how to propose the next iterate from the current one and its
residual (``init`` / ``propose``). The driver in :func:`iterate` owns everything that
must be the same for all of them and is decided per sample:

* the residual ``g(z) = f(z) − z`` is measured at every iterate, ``abs`` as
  ``‖g‖₂`` or ``rel`` as ``‖g‖₂ / ‖f(z)‖₂``;
* a sample whose residual reaches ``tol`` stops changing (its proposals are masked)
  while the others go on; the loop ends when every sample has stopped or the
  evaluation budget is spent;
* a sample is flagged ``diverged`` and stopped when, with ``r = divergence_ratio``,
  any of these holds at an iterate ``z_k`` (see :func:`iterate` for the rule):
  its map value is non-finite; its stop-mode residual exceeds ``r`` times its best
  one; or, whatever the stop mode, ``‖z_k‖`` or ``‖f(z_k) − z_k‖`` exceeds ``r``
  times the sample's initial scale. The last test catches iterates that blow up
  while the relative residual stays bounded (a linear map of spectral radius ≫ 1);
* each sample returns the iterate with its lowest residual, not the last one.

With ``stop_scope="batch"`` the residual is instead measured on the whole batch as
one vector, and stopping, the divergence break and the choice of the returned
iterate (the step with the lowest batch residual) are decided for all samples at
once, as the DEQ authors' own solvers decide them (locuslab/deq); the solver's
proposals stay per sample.

The loop is a ``lax.while_loop``: no host synchronisation per step, static shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdeq._src import batched_tree
from jdeq._src.config import require, require_choice, require_positive
from jdeq._src.stats import SolverStats

FlatMap = Callable[[jax.Array], jax.Array]
STOP_MODES = ("abs", "rel")
STOP_SCOPES = ("sample", "batch")


@dataclasses.dataclass(frozen=True)
class AbstractSolver:
  """Fields and validation shared by the fixed-point solvers.

  Attributes:
    max_iter: budget of map evaluations per solve (the first, at ``z0``, included).
    tol: a sample has converged when its stop-mode residual is ``<= tol``.
    stop_mode: ``"abs"`` for ``‖f(z) − z‖`` or ``"rel"`` for ``‖f(z) − z‖ / ‖f(z)‖``.
    record_trace: keep the per-evaluation residuals in ``SolverStats.trace``.
    divergence_ratio: ``r`` of the divergence rule (see :func:`iterate`): a
      stop-mode residual above ``r`` times the sample's best one (the reference
      solvers' protective break), or an iterate or absolute residual above ``r``
      times the sample's initial scale, flags the sample as diverged.
    stop_scope: ``"sample"`` (each sample stops, diverges and keeps its best
      iterate on its own residual) or ``"batch"`` (on the residual of the whole
      batch, ``‖f(Z) − Z‖_F`` or ``‖f(Z) − Z‖_F / ‖f(Z)‖_F``: every sample stops at
      the same evaluation and returns the iterate of the step with the lowest
      batch residual, as locuslab/deq's solvers do; for parity with that code).
  """
  max_iter: int = 50
  tol: float = 1e-3
  stop_mode: str = "rel"
  record_trace: bool = dataclasses.field(default=False, kw_only=True)
  divergence_ratio: float = dataclasses.field(default=1e4, kw_only=True)
  stop_scope: str = dataclasses.field(default="sample", kw_only=True)

  def __post_init__(self) -> None:
    require(isinstance(self.max_iter, int) and self.max_iter >= 1, self,
            f"max_iter must be an integer >= 1, got {self.max_iter!r}")
    require(self.tol > 0, self, f"tol must be > 0, got {self.tol!r}")
    require_choice(self, "stop_mode", self.stop_mode, STOP_MODES)
    require_choice(self, "stop_scope", self.stop_scope, STOP_SCOPES)
    require_positive(self, divergence_ratio=self.divergence_ratio)
    require(self.divergence_ratio > 1, self,
            f"divergence_ratio must be > 1, got {self.divergence_ratio!r}")

  def init(self, z: jax.Array, g: jax.Array) -> Any:
    """Solver state after the first evaluation (``z``: ``(B, D)``, ``g = f(z) − z``)."""
    raise NotImplementedError

  def propose(self, state: Any, z: jax.Array, g: jax.Array) -> tuple[jax.Array, Any]:
    """Next iterate for every sample, given the current one and its residual."""
    raise NotImplementedError


def _measure(z: jax.Array, fz: jax.Array, stop_mode: str, stop_scope: str = "sample"):
  # Materialize f(z) once: left to itself, XLA fuses the map's last operations (a
  # normalization, say) into every consumer below and recomputes them in each pass.
  fz = jax.lax.optimization_barrier(fz)
  g = fz - z
  abs_res = batched_tree.per_sample_norm(g)
  image_norm = batched_tree.per_sample_norm(fz)
  rel_res = abs_res / (image_norm + jnp.finfo(z.dtype).tiny)
  crit = abs_res if stop_mode == "abs" else rel_res
  if stop_scope == "batch":  # the Frobenius norms of the whole batch, for every sample
    batch_abs = jnp.sqrt(jnp.sum(jnp.square(abs_res)))
    batch_crit = batch_abs if stop_mode == "abs" else batch_abs / (
        jnp.sqrt(jnp.sum(jnp.square(image_norm))) + jnp.finfo(z.dtype).tiny)
    crit = jnp.broadcast_to(batch_crit, crit.shape)
  # A non-finite entry of f(z) (or z) makes ‖g‖ inf or NaN, so checking the norms
  # catches it without a pass of its own over f(z). NaN and inf compare false
  # everywhere below; make them an explicit +inf.
  crit = jnp.where(jnp.isfinite(crit) & jnp.isfinite(abs_res), crit, jnp.inf)
  return g, abs_res, rel_res, crit


def _initial_scale(z0: jax.Array, fz0: jax.Array) -> jax.Array:
  """``s = max(‖z₀‖, ‖f(z₀)‖, √D)`` per sample: the yardstick of the growth test.

  The ``√D`` floor (unit RMS per entry) keeps a start far below the state's natural
  scale (``z₀ = 0`` with a nearly zero injection) from making the first steps
  towards an ``O(1)`` equilibrium look like a blow-up.
  """
  floor = jnp.sqrt(jnp.asarray(z0.shape[1], z0.dtype))
  return jnp.maximum(jnp.maximum(batched_tree.per_sample_norm(z0),
                                 batched_tree.per_sample_norm(fz0)), floor)


def _grew(z: jax.Array, abs_res: jax.Array, limit: jax.Array) -> jax.Array:
  """``‖z‖ > limit`` or ``‖f(z) − z‖ > limit``, per sample (NaN compares false)."""
  return (batched_tree.per_sample_norm(z) > limit) | (abs_res > limit)


def _scoped(flags: jax.Array, stop_scope: str) -> jax.Array:
  """Per-sample flags, or under ``stop_scope="batch"`` any sample's flag for all."""
  if stop_scope == "batch":
    return jnp.broadcast_to(jnp.any(flags), flags.shape)
  return flags


def check_budget(solver: AbstractSolver, budget: Any) -> None:
  """Refuses a Python-integer ``budget`` outside ``[1, solver.max_iter]``.

  Arrays (traced or not) pass: :func:`iterate` clips them to that range, since a
  traced value cannot be checked without a host synchronisation.

  Raises:
    ValueError: naming the budget and the solver's ``max_iter``.
  """
  if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
    if not 1 <= budget <= solver.max_iter:
      raise ValueError(
          f"budget must be in [1, max_iter={solver.max_iter}] (the evaluation at "
          f"z0 included), got {budget}")


def iterate(solver: AbstractSolver, fn: FlatMap, z0: jax.Array,
            budget: jax.Array | int | None = None) -> tuple[jax.Array, SolverStats]:
  """Solves ``fn(z) = z`` per sample, for ``z0`` of shape ``(B, D)``.

  Divergence rule. With ``r = solver.divergence_ratio``, ``c_k`` the stop-mode
  residual of iterate ``z_k`` and ``s = max(‖z₀‖, ‖f(z₀)‖, √D)`` the sample's
  initial scale, a sample still running is flagged ``diverged`` (and stopped) at
  the first ``k`` where

    f(z_k) is not finite,   or   c_k > r · min_{j<k} c_j,
    or   ‖z_k‖ > r · s,   or   ‖f(z_k) − z_k‖ > r · s.

  The last two hold whatever the stop mode: under ``stop_mode="rel"`` the ratio
  ``‖f(z) − z‖ / ‖f(z)‖`` of iterates that blow up (``f(z) = A z + b`` with spectral
  radius ``ρ(A) ≫ 1``) stays bounded while ``‖z_k‖`` grows like ``ρᵏ``. A sample
  that reached the tolerance at its best iterate is reported converged, never
  diverged. Every test is an elementwise comparison in the loop's carry: no host
  synchronisation, static shapes.

  Args:
    solver: the solver configuration.
    fn: the map, ``(B, D) -> (B, D)``, sample-wise independent.
    z0: the initial iterate.
    budget: optional, possibly traced, evaluation budget. It is clipped to
      ``[1, solver.max_iter]`` (the evaluation at ``z0`` always happens); a Python
      integer outside that range is a ``ValueError`` instead.

  Returns:
    The lowest-residual iterate of each sample and the per-sample statistics.

  Raises:
    ValueError: if ``budget`` is a Python integer outside ``[1, solver.max_iter]``.
  """
  z, stats, _ = _drive(solver, fn, z0, budget, ())
  return z, stats


def iterate_recording(solver: AbstractSolver, fn: FlatMap, z0: jax.Array,
                      record_at: tuple[int, ...],
                      budget: jax.Array | int | None = None
                      ) -> tuple[jax.Array, SolverStats, jax.Array]:
  """:func:`iterate`, also returning the iterate it would return at other budgets.

  One loop runs, to at most ``record_at[-1]`` evaluations (and at most ``budget``).
  Whenever the evaluation count reaches an entry ``i`` of ``record_at``, the
  per-sample best iterate so far is written to slot ``i`` of a static
  ``(len(record_at), B, D)`` buffer (one dynamic update per step, no host
  synchronisation). Slots the loop never reached, because every sample stopped
  earlier or the budget ran out, get the final best iterate. Since a stopped sample
  keeps its best iterate, slot ``i`` holds, per sample, exactly what
  ``iterate(solver, fn, z0, budget=min(i, budget))`` returns.

  Args:
    solver: the solver configuration.
    fn: the map, ``(B, D) -> (B, D)``, sample-wise independent.
    z0: the initial iterate.
    record_at: static, strictly increasing evaluation counts in
      ``[1, solver.max_iter]``.
    budget: optional, possibly traced, evaluation budget (see :func:`iterate`).

  Returns:
    ``(z, stats, recorded)``: the result of the whole (``record_at[-1]``-budget)
    solve, its statistics and the ``(len(record_at), B, D)`` recorded iterates.

  Raises:
    ValueError: if ``record_at`` is empty, not strictly increasing Python
      integers, or outside ``[1, solver.max_iter]``, or if ``budget`` is a Python
      integer outside ``[1, solver.max_iter]``.
  """
  check_record_at(solver, record_at)
  return _drive(solver, fn, z0, budget, tuple(int(i) for i in record_at))


def check_record_at(solver: AbstractSolver, record_at: Any) -> None:
  """Refuses evaluation counts that are not strictly increasing ints in range.

  Raises:
    ValueError: naming the offending entry and the solver's ``max_iter``.
  """
  if not isinstance(record_at, (tuple, list)) or not record_at:
    raise ValueError(f"indices must be a non-empty tuple of Python ints (evaluation "
                     f"counts; jdeq.correction_indices(max_iter, n) spreads n of "
                     f"them evenly), got {record_at!r}")
  for i in record_at:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
      raise ValueError(f"indices must be static Python ints (evaluation counts), got "
                       f"{i!r} of type {type(i).__name__} in {record_at!r}")
    if not 1 <= i <= solver.max_iter:
      raise ValueError(f"indices must be in [1, max_iter={solver.max_iter}] (the "
                       f"evaluation at z0 included), got {i} in {tuple(record_at)}")
  if any(b <= a for a, b in zip(record_at, record_at[1:])):
    raise ValueError(f"indices must be strictly increasing, got {tuple(record_at)}")


def _drive(solver, fn, z0, budget, record_at):
  """The loop of :func:`iterate`, recording best iterates at ``record_at`` if any."""
  check_budget(solver, budget)
  batch = z0.shape[0]
  limit = solver.max_iter if budget is None else jnp.clip(
      jnp.asarray(budget, jnp.int32), 1, solver.max_iter)
  if record_at:  # no need to go past the last recorded evaluation
    limit = jnp.minimum(limit, record_at[-1])
  trace_len = solver.max_iter if solver.record_trace else 0
  slots = jnp.asarray(record_at, jnp.int32) if record_at else None

  def record(recorded, k, best_z):
    # Slot j if k == record_at[j], else the spare last slot (dropped at the end).
    hit = slots == k
    slot = jnp.where(jnp.any(hit), jnp.argmax(hit), len(record_at))
    return jax.lax.dynamic_update_index_in_dim(recorded, best_z, slot, 0)

  fz0 = fn(z0)
  g0, abs0, rel0, crit0 = _measure(z0, fz0, solver.stop_mode, solver.stop_scope)
  growth_limit = solver.divergence_ratio * _initial_scale(z0, fz0)
  converged0 = crit0 <= solver.tol
  diverged0 = _scoped(~jnp.isfinite(crit0), solver.stop_scope)
  trace0 = jnp.zeros((batch, trace_len), z0.dtype)
  if trace_len:
    trace0 = trace0.at[:, 0].set(crit0)
  carry0 = dict(
      k=jnp.asarray(1, jnp.int32), z=z0, g=g0, state=solver.init(z0, g0),
      best_z=z0, best_abs=abs0, best_rel=rel0, best_crit=crit0, last_crit=crit0,
      done=converged0 | diverged0, diverged=diverged0,
      nstep=jnp.ones((batch,), jnp.int32), trace=trace0)
  if record_at:
    carry0["recorded"] = record(
        jnp.zeros((len(record_at) + 1,) + z0.shape, z0.dtype), carry0["k"], z0)

  def cond(c):
    return (c["k"] < limit) & ~jnp.all(c["done"])

  def body(c):
    active = ~c["done"]
    proposal, state = solver.propose(c["state"], c["z"], c["g"])
    z = jnp.where(active[:, None], proposal, c["z"])
    # g is not masked: an inactive sample keeps its z, so f(z) and g are the ones it
    # had, and its proposal is discarded anyway.
    g, abs_res, rel_res, crit = _measure(z, fn(z), solver.stop_mode, solver.stop_scope)
    improved = active & (crit < c["best_crit"])
    exploded = active & _scoped((crit > solver.divergence_ratio * c["best_crit"])
                                | _grew(z, abs_res, growth_limit), solver.stop_scope)
    converged = active & (crit <= solver.tol)
    last_crit = jnp.where(active, crit, c["last_crit"])
    trace = c["trace"]
    if trace_len:
      trace = jax.lax.dynamic_update_slice(trace, last_crit[:, None], (jnp.zeros_like(c["k"]), c["k"]))
    best_z = jnp.where(improved[:, None], z, c["best_z"])
    out = dict(
        k=c["k"] + 1, z=z, g=g, state=state,
        best_z=best_z,
        best_abs=jnp.where(improved, abs_res, c["best_abs"]),
        best_rel=jnp.where(improved, rel_res, c["best_rel"]),
        best_crit=jnp.where(improved, crit, c["best_crit"]),
        last_crit=last_crit,
        done=c["done"] | converged | exploded,
        diverged=c["diverged"] | exploded,
        nstep=c["nstep"] + active.astype(jnp.int32),
        trace=trace)
    if record_at:
      out["recorded"] = record(c["recorded"], out["k"], best_z)
    return out

  c = jax.lax.while_loop(cond, body, carry0)
  trace = c["trace"]
  if trace_len:
    columns = jnp.arange(trace_len)[None, :]
    trace = jnp.where(columns >= c["k"], c["last_crit"][:, None], trace)
  converged = c["best_crit"] <= solver.tol
  stats = SolverStats(
      nstep=c["nstep"], abs_residual=c["best_abs"], rel_residual=c["best_rel"],
      converged=converged, diverged=c["diverged"] & ~converged, trace=trace)
  recorded = None
  if record_at:
    reached = (slots <= c["k"])[:, None, None]
    recorded = jnp.where(reached, c["recorded"][:-1], c["best_z"][None])
  return c["best_z"], stats, recorded

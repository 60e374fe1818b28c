"""The differentiable equilibrium ``z* = f(z*, *args)``.

``fixed_point`` runs a solver without tracing its iterations for autodiff, then
attaches the chosen gradient mode:

* :class:`~jdeq.IFT` — a ``jax.custom_jvp`` whose tangent is the solution of the
  linear system ``(I − J) ż = (∂f/∂θ) θ̇``, expressed with ``lax.custom_linear_solve``.
  JAX transposes that system for reverse mode, so the same definition serves
  ``jax.jvp`` and ``jax.grad`` and stores nothing of the forward iterations: the
  backward pass solves ``u = u J + ∂ℓ/∂z*`` with the configured backward solver.
* :class:`~jdeq.Phantom`, :class:`~jdeq.JFB` — ordinary autodiff through a few steps
  of ``f`` from ``stop_gradient(z*)``.
* :class:`~jdeq.Unrolled` — ordinary autodiff through ``steps`` iterations from z0.

Backward statistics: ``custom_vjp``/``custom_jvp`` rules cannot return auxiliary
outputs, so the statistics of the IFT backward solve leave through the cotangent of
an extra input, the *backward probe* (see :func:`jdeq.backward_stats_probe`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.custom_derivatives import SymbolicZero

from jdeq._src import batched_tree
from jdeq._src.gradients import IFT, JFB, GradientMode, Krylov, Phantom, Unrolled
from jdeq._src.solvers.anderson import Anderson
from jdeq._src.solvers.base import AbstractSolver, check_budget, iterate
from jdeq._src.stats import SolverStats, backward_stats_probe, stats_to_probe

PyTree = Any


def fixed_point(
    f: Callable[..., PyTree],
    z0: PyTree,
    *args: PyTree,
    solver: AbstractSolver = Anderson(),
    grad: GradientMode = IFT(),
    budget: jax.Array | int | None = None,
    backward_probe: jax.Array | None = None,
) -> tuple[PyTree, SolverStats]:
  """Solves ``z* = f(z*, *args)`` per sample and makes ``z*`` differentiable in ``args``.

  Args:
    f: the map, ``f(z, *args) -> pytree like z``, independent across samples (no
      batch statistics inside).
    z0: initial state, a pytree whose leaves share a leading batch axis ``B`` and one
      floating dtype. Not differentiated (``z*`` does not depend on it), except in
      :class:`~jdeq.Unrolled` mode.
    *args: pytrees (parameters, input injection) that ``f`` depends on.
    solver: forward solver configuration.
    grad: gradient mode (``IFT``, ``Phantom``, ``JFB`` or ``Unrolled``).
    budget: optional, possibly traced, forward evaluation budget, at most
      ``solver.max_iter``; varies the stopping point without recompiling (forward
      budget jitter, hard-stopped evaluation). A traced value is clipped to
      ``[1, solver.max_iter]``; a Python integer outside that range is an error.
    backward_probe: optional output of :func:`jdeq.backward_stats_probe`; its gradient
      holds the statistics of the IFT backward solve (zero for the other modes,
      whose backward pass is a fixed number of steps).

  Returns:
    ``(z_star, stats)``: the equilibrium (for Phantom/JFB, the last differentiated
    step from it) and the forward :class:`~jdeq.SolverStats`.

  Non-finite values are data, not errors: a sample whose map value is NaN or inf
  (a NaN in its input, say) is flagged ``stats.diverged``, and the solve keeps its
  best finite iterate (``z0`` if there is none).

  Raises:
    ValueError: if ``f(z0, *args)`` does not match ``z0`` in structure, shape or
      dtype, if ``z0`` is not a batched float32 or float64 pytree, if a Python
      integer ``budget`` is outside ``[1, solver.max_iter]``, or if a configuration
      is of the wrong kind.
  """
  if not isinstance(solver, AbstractSolver):
    raise ValueError(f"solver must be FixedPointIteration, Anderson or Broyden, got "
                     f"{solver!r}")
  if not isinstance(grad, (IFT, Phantom, JFB, Unrolled)):
    raise ValueError(f"grad must be IFT, Phantom, JFB or Unrolled, got {grad!r}")
  check_budget(solver, budget)
  z0 = jax.tree.map(jnp.asarray, z0)
  layout = batched_tree.layout_of(z0, "z0")
  batched_tree.check_same_structure(
      z0, jax.eval_shape(f, z0, *args), "f(z0, *args)")
  if backward_probe is None:
    backward_probe = backward_stats_probe(layout.batch_size, layout.dtype)

  if isinstance(grad, Unrolled):
    return _unrolled(f, z0, args, grad, layout)
  if isinstance(grad, IFT):
    closed_f, consts = jax.closure_convert(f, z0, *args)
    z_star, stats, _ = _implicit(closed_f, grad.solver, solver, layout)(
        z0, (*args, *consts), backward_probe, budget)
    return z_star, stats

  z_star, stats = _solve(f, z0, jax.lax.stop_gradient(args), solver, layout, budget)
  z_star = jax.lax.stop_gradient(z_star)
  if isinstance(grad, JFB):
    return f(z_star, *args), stats
  return _phantom(f, z_star, args, grad), stats


def _solve(f, z0, args, solver, layout, budget):
  flat_f = batched_tree.flat_function(lambda z: f(z, *args), layout)
  z_flat, stats = iterate(solver, flat_f, batched_tree.flatten(z0, layout), budget)
  return batched_tree.unflatten(z_flat, layout), stats


def _implicit(f, backward_solver, solver, layout):
  """The IFT equilibrium as a custom_jvp of ``(z0, args, probe, budget)``."""

  @jax.custom_jvp
  def equilibrium(z0, args, probe, budget):
    z_star, stats = _solve(f, z0, args, solver, layout, budget)
    return z_star, stats, probe

  def equilibrium_jvp(primals, tangents):
    z0, args, probe, budget = primals
    _, args_dot, probe_dot, _ = tangents
    z_star, stats = _solve(f, z0, args, solver, layout, budget)
    stats_dot = jax.tree.map(_zero_tangent, stats)
    z_dot, probe_out_dot = _ift_tangent(f, z_star, args, args_dot, probe, probe_dot,
                                        backward_solver, layout)
    return (z_star, stats, probe), (z_dot, stats_dot, probe_out_dot)

  equilibrium.defjvp(equilibrium_jvp, symbolic_zeros=True)
  return equilibrium


def implicit_at(f, backward_solver, layout):
  """The IFT gradient attached to a given equilibrium: a custom_jvp of ``(z*, args, probe)``.

  The primal output is ``(z*, probe)`` unchanged; the tangent of ``z*`` is the
  solution of ``(I − J) ż = (∂f/∂θ) θ̇`` at that ``z*`` (the tangent of the ``z*``
  input itself is ignored, as the tangent of ``z0`` is in :func:`fixed_point`).
  ``f`` must be closed (``jax.closure_convert``).
  """

  @jax.custom_jvp
  def attach(z_star, args, probe):
    return z_star, probe

  def attach_jvp(primals, tangents):
    z_star, args, probe = primals
    _, args_dot, probe_dot = tangents
    z_dot, probe_out_dot = _ift_tangent(f, z_star, args, args_dot, probe, probe_dot,
                                        backward_solver, layout)
    return (z_star, probe), (z_dot, probe_out_dot)

  attach.defjvp(attach_jvp, symbolic_zeros=True)
  return attach


def _ift_tangent(f, z_star, args, args_dot, probe, probe_dot, backward_solver,
                 layout):
  """``(ż, probe tangent)`` of the IFT equilibrium at ``z_star`` (see :func:`_implicit`)."""
  # Symbolic zeros must stay out of the linear solve: its transpose needs every
  # right-hand side to depend linearly on the differentiated inputs.
  args_zero = [isinstance(t, SymbolicZero) for t in jax.tree.leaves(args_dot)]
  if all(args_zero):
    return jax.tree.map(jnp.zeros_like, z_star), _instantiate(probe_dot)
  args_dot = jax.tree.map(_instantiate, args_dot)
  _, injected = jax.jvp(lambda a: f(z_star, *a), (args,), (args_dot,))
  _, jacobian_vp = jax.linearize(lambda z: f(z, *args), z_star)

  def minus_jacobian(v):
    return jax.tree.map(jnp.subtract, v, jacobian_vp(v))

  if isinstance(probe_dot, SymbolicZero):
    z_dot = jax.lax.custom_linear_solve(
        minus_jacobian, injected,
        solve=lambda op, b: _solve_linear(op, b, backward_solver, layout)[0],
        transpose_solve=lambda op, b: _solve_linear(op, b, backward_solver, layout)[0])
    return z_dot, jnp.zeros_like(probe)

  def system(x):  # (I − J) v, with the probe channel passed through unchanged
    v, p = x
    return minus_jacobian(v), p

  def solve(operator, rhs):
    b, p = rhs
    no_probe = jnp.zeros_like(p)
    x, solve_stats = _solve_linear(
        lambda v: operator((v, no_probe))[0], b, backward_solver, layout)
    return x, p + stats_to_probe(solve_stats, p.dtype)

  return jax.lax.custom_linear_solve(
      system, (injected, probe_dot), solve=solve, transpose_solve=solve)


def _solve_linear(operator, rhs, backward_solver, layout):
  """Solves ``operator(v) = rhs`` for ``operator = I − J`` (or its transpose).

  A fixed-point solver iterates ``v ← rhs + v − operator(v) = rhs + J v`` from 0.
  """
  def linear_map(v):
    return jax.tree.map(lambda r, v_, a: r + v_ - a, rhs, v, operator(v))

  if isinstance(backward_solver, AbstractSolver):
    zeros = jax.tree.map(jnp.zeros_like, rhs)
    return _solve(lambda v: linear_map(v), zeros, (), backward_solver, layout, None)

  import jaxopt  # pylint: disable=g-import-not-at-top  (only Krylov users need it)
  krylov_solve = (jaxopt.linear_solve.solve_gmres if backward_solver.method == "gmres"
                  else jaxopt.linear_solve.solve_normal_cg)
  options = dict(tol=backward_solver.tol, maxiter=backward_solver.max_iter)
  if backward_solver.method == "gmres":
    options["restart"] = backward_solver.restart
  x = krylov_solve(operator, rhs, **options)
  return x, _linear_stats(x, linear_map(x), backward_solver, layout)


def _linear_stats(x, mapped, backward_solver: Krylov, layout) -> SolverStats:
  flat_x = batched_tree.flatten(x, layout)
  flat_mapped = batched_tree.flatten(mapped, layout)
  abs_res = batched_tree.per_sample_norm(flat_mapped - flat_x)
  rel_res = abs_res / (batched_tree.per_sample_norm(flat_mapped)
                       + jnp.finfo(flat_x.dtype).tiny)
  converged = rel_res <= backward_solver.tol
  return SolverStats(
      nstep=jnp.full(abs_res.shape, backward_solver.max_iter, jnp.int32),
      abs_residual=abs_res, rel_residual=rel_res, converged=converged,
      diverged=~jnp.isfinite(abs_res),
      trace=jnp.zeros(abs_res.shape + (0,), flat_x.dtype))


def _instantiate(tangent):
  if isinstance(tangent, SymbolicZero):
    return _zero_tangent(tangent)
  return tangent


def _zero_tangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _phantom(f, z_star, args, grad: Phantom):
  """``k`` damped steps from ``z*``, differentiated by ordinary autodiff."""
  damping = grad.damping
  if grad.neumann:
    f_star = f(z_star, *args)
    _, jacobian_vp = jax.linearize(
        lambda z: f(z, *jax.lax.stop_gradient(args)), z_star)

    def step(h):
      shift = jax.tree.map(jnp.subtract, h, z_star)
      linear = jax.tree.map(jnp.add, f_star, jacobian_vp(shift))
      return jax.tree.map(lambda a, b: (1 - damping) * a + damping * b, h, linear)
  else:
    def step(h):
      return jax.tree.map(lambda a, b: (1 - damping) * a + damping * b,
                          h, f(h, *args))

  return _iterate_steps(step, z_star, grad.k, grad.unroll)


def _iterate_steps(step, z, steps, unroll):
  """``steps`` applications of ``step`` as one ``lax.scan`` (``unroll`` as its own)."""
  if steps == 0:
    return z
  return jax.lax.scan(lambda h, _: (step(h), None), z, None, length=steps,
                      unroll=unroll)[0]


def _unrolled(f, z0, args, grad: Unrolled, layout):
  """``grad.steps`` plain iterations, differentiated by ordinary autodiff (memory ∝ steps)."""
  before_last = _iterate_steps(lambda z: f(z, *args), z0, grad.steps - 1, grad.unroll)
  z = f(before_last, *args)
  # The last update is the residual f(z_{T−1}) − z_{T−1}: free, and within one step
  # of the returned iterate.
  mapped = jax.lax.stop_gradient(batched_tree.flatten(z, layout))
  last = mapped - jax.lax.stop_gradient(batched_tree.flatten(before_last, layout))
  abs_res = batched_tree.per_sample_norm(last)
  rel_res = abs_res / (batched_tree.per_sample_norm(mapped) + jnp.finfo(last.dtype).tiny)
  batch = layout.batch_size
  stats = SolverStats(
      nstep=jnp.full((batch,), grad.steps, jnp.int32), abs_residual=abs_res,
      rel_residual=rel_res, converged=jnp.zeros((batch,), bool),
      diverged=~jnp.isfinite(abs_res), trace=jnp.zeros((batch, 0), last.dtype))
  return z, stats

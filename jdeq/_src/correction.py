"""Fixed-point correction: a loss over several states of one forward solve.

Bai et al. ("Deep Equilibrium Optical Flow Estimation", CVPR 2022) supervise not only
the final equilibrium estimate but also states sampled from the solver's trajectory,

    L = Σ_{j=0}^{N−1} w^{N−1−j} ℓ(z_{i_j}),        i_0 < i_1 < … < i_{N−1},

where ``z_i`` is the solver's estimate after ``i`` evaluations of the map, each
state gets a cheap gradient of its own (one step from ``stop_gradient(z_i)``, or a
few damped Phantom steps; IFT for the last), and ``w < 1`` (0.8 in DEQ-Flow) weights
the later, better states more. The terms pull the whole trajectory towards a good
answer, which stabilizes training with inexact gradients.

:func:`fixed_point_states` runs the solver once (one ``lax.while_loop``, static
shapes, no host synchronisation) and records the per-sample best iterate when the
evaluation count reaches each index; :func:`correction_loss` is the weighted sum;
:func:`correction_indices` spreads ``n`` indices over a budget as TorchDEQ's
``n_states`` option does.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jdeq._src import batched_tree
from jdeq._src.fixed_point import _phantom, implicit_at
from jdeq._src.gradients import IFT, JFB, Phantom
from jdeq._src.solvers.anderson import Anderson
from jdeq._src.solvers.base import (AbstractSolver, check_budget, check_record_at,
                                    iterate_recording)
from jdeq._src.stats import SolverStats, backward_stats_probe

PyTree = Any
StateGradient = Union[Phantom, JFB, IFT]


def fixed_point_states(
    f: Callable[..., PyTree],
    z0: PyTree,
    *args: PyTree,
    indices: Sequence[int],
    solver: AbstractSolver = Anderson(),
    grad: StateGradient | Sequence[StateGradient] = JFB(),
    budget: jax.Array | int | None = None,
    backward_probe: jax.Array | None = None,
) -> tuple[tuple[PyTree, ...], SolverStats]:
  """Differentiable states of one solve of ``z = f(z, *args)`` at given iteration counts.

  The solver runs once, for ``indices[-1]`` evaluations at most (fewer if every
  sample stops earlier, or if ``budget`` is smaller). State ``j`` starts from
  ``z_{i_j}``, the per-sample best iterate after ``i_j = indices[j]`` evaluations,
  which is exactly what ``jdeq.fixed_point(..., budget=i_j)`` solves for: a sample
  that stopped before ``i_j`` (converged or diverged) contributes its final
  estimate. Each state is then made differentiable in ``args`` by its gradient
  mode, independently of the others:

  * :class:`~jdeq.JFB`: ``f(stop_gradient(z_i), *args)``;
  * :class:`~jdeq.Phantom`: ``k`` damped steps ``h ← (1 − λ) h + λ f(h)`` from
    ``h₀ = stop_gradient(z_i)``;
  * :class:`~jdeq.IFT` (last state only): ``z_i`` itself with the implicit
    gradient at ``z_i``, as TorchDEQ's ``ift=True`` does for the final state.

  So the gradient of any loss of the states is the sum of the gradients
  ``fixed_point(..., budget=i_j, grad=grad_j)`` would give state by state, for the
  cost of one solve (plus each state's gradient steps); the solve carries
  ``len(indices) + 1`` extra copies of the state. Combine the per-state losses with
  :func:`correction_loss`.

  This is TorchDEQ's ``DEQIndexing`` with ``indexing``/``n_states`` (see
  :func:`correction_indices`), with two differences: a batch that converges before
  an index still gets every state (TorchDEQ returns fewer), and TorchDEQ's states are
  the best map values ``f(z)`` while these are the best iterates ``z`` (one map
  evaluation apart; jdeq's convention throughout).

  Args:
    f: the map, ``f(z, *args) -> pytree like z``, independent across samples.
    z0: initial state, a batched float32/float64 pytree (not differentiated).
    *args: pytrees (parameters, input injection) that ``f`` depends on.
    indices: static, strictly increasing evaluation counts in
      ``[1, solver.max_iter]`` (``1`` is ``z0`` itself); the last is the final
      state. DEQ-Flow uses a few evenly spaced ones ending at the budget.
    solver: forward solver configuration.
    grad: one gradient mode for every state, or one per state (a sequence as long
      as ``indices``). :class:`~jdeq.Phantom` or :class:`~jdeq.JFB`; the last may
      also be :class:`~jdeq.IFT`.
    budget: optional, possibly traced, forward budget (see :func:`jdeq.fixed_point`);
      states at indices beyond it are the final state.
    backward_probe: optional :func:`jdeq.backward_stats_probe`, whose gradient holds
      the statistics of the IFT backward solve of the last state (zeros otherwise).

  Returns:
    ``(states, stats)``: a tuple of ``len(indices)`` pytrees like ``z0``, in the
    order of ``indices``, and the forward :class:`~jdeq.SolverStats` of the solve
    (to ``indices[-1]`` evaluations).

  Raises:
    ValueError: if ``indices`` is empty, not strictly increasing Python ints, or
      outside ``[1, solver.max_iter]``; if ``grad`` is not as described above; and
      in every case where :func:`jdeq.fixed_point` raises one.
  """
  if not isinstance(solver, AbstractSolver):
    raise ValueError(f"solver must be FixedPointIteration, Anderson or Broyden, got "
                     f"{solver!r}")
  check_record_at(solver, indices)
  indices = tuple(int(i) for i in indices)
  modes = _modes_per_state(grad, len(indices))
  check_budget(solver, budget)
  z0 = jax.tree.map(jnp.asarray, z0)
  layout = batched_tree.layout_of(z0, "z0")
  batched_tree.check_same_structure(
      z0, jax.eval_shape(f, z0, *args), "f(z0, *args)")

  frozen = jax.lax.stop_gradient(args)
  flat_f = batched_tree.flat_function(lambda z: f(z, *frozen), layout)
  _, stats, recorded = iterate_recording(
      solver, flat_f, batched_tree.flatten(z0, layout), indices, budget)
  recorded = jax.lax.stop_gradient(recorded)

  states = []
  for j, mode in enumerate(modes):
    z_i = batched_tree.unflatten(recorded[j], layout)
    if isinstance(mode, JFB):
      states.append(f(z_i, *args))
    elif isinstance(mode, Phantom):
      states.append(_phantom(f, z_i, args, mode))
    else:
      if backward_probe is None:
        backward_probe = backward_stats_probe(layout.batch_size, layout.dtype)
      closed_f, consts = jax.closure_convert(f, z_i, *args)
      z_ift, _ = implicit_at(closed_f, mode.solver, layout)(
          z_i, (*args, *consts), backward_probe)
      states.append(z_ift)
  return tuple(states), stats


def _modes_per_state(grad: Any, n: int) -> tuple[StateGradient, ...]:
  """One gradient mode per state; IFT only for the last one."""
  if isinstance(grad, (list, tuple)):
    if len(grad) != n:
      raise ValueError(f"grad must be one gradient mode or one per index ({n}), got "
                       f"{len(grad)}: {tuple(grad)!r}")
    modes = tuple(grad)
  else:
    modes = (grad,) * n
  for j, mode in enumerate(modes):
    if isinstance(mode, IFT):
      if j != n - 1:
        raise ValueError(
            f"grad: IFT is only available for the last state (index {n - 1}), got it "
            f"for state {j}; give the intermediate states Phantom or JFB, e.g. "
            f"grad=(JFB(),) * {n - 1} + (IFT(),)")
    elif not isinstance(mode, (Phantom, JFB)):
      raise ValueError(f"grad of each state must be Phantom or JFB (IFT for the last "
                       f"one), got {mode!r}")
  return modes


def correction_loss(losses: Sequence[jax.Array] | jax.Array,
                    decay: float = 0.8) -> jax.Array:
  """The fixed-point correction loss: ``Σ_{j=0}^{N−1} decay^{N−1−j} · losses[j]``.

  With ``ℓ_j`` the loss of state ``j`` of :func:`fixed_point_states` (ordered from
  the earliest to the final state), the last state has weight 1 and each earlier
  one ``decay`` times the weight of its successor: ``w_j = γ^{N−1−j}``. This is
  TorchDEQ's ``fp_correction`` with its default ``"exp"`` weights; DEQ-Flow (Bai
  et al., 2022) uses ``γ = 0.8``. With one state it is that state's loss.

  Args:
    losses: the per-state losses, a sequence of arrays of one shape (scalars, or
      per-sample losses to be reduced later), or an array whose leading axis
      indexes the states.
    decay: ``γ ∈ (0, 1]``, a Python number.

  Returns:
    The weighted sum, of the shape of one loss.

  Raises:
    ValueError: if ``decay`` is not a real number in ``(0, 1]``, or ``losses`` is
      empty or its entries disagree in shape.
  """
  if (not isinstance(decay, numbers.Real) or isinstance(decay, bool)
      or not 0 < decay <= 1):
    raise ValueError(f"correction_loss: decay must be a real number in (0, 1], got "
                     f"{decay!r}")
  if isinstance(losses, (jax.Array, np.ndarray)):
    if losses.ndim == 0:
      raise ValueError("correction_loss: losses must be a sequence of per-state losses "
                       "or an array with a leading state axis, got a scalar")
    losses = list(losses)
  losses = [jnp.asarray(loss) for loss in losses]
  if not losses:
    raise ValueError("correction_loss: losses must not be empty")
  shapes = {loss.shape for loss in losses}
  if len(shapes) > 1:
    raise ValueError(f"correction_loss: every loss must have the same shape, got "
                     f"{[loss.shape for loss in losses]}")
  n = len(losses)
  return sum(float(decay) ** (n - 1 - j) * loss for j, loss in enumerate(losses))


def correction_indices(max_iter: int, n_states: int) -> tuple[int, ...]:
  """``n_states`` evenly spaced evaluation counts ending at ``max_iter``.

  With ``δ = ⌊max_iter / n⌋`` the indices are ``max_iter − (n − 1 − j) δ`` for
  ``j = 0 … n − 1`` (``δ, 2δ, …, max_iter`` when ``n`` divides ``max_iter``), the
  schedule of TorchDEQ's ``n_states`` option.

  Args:
    max_iter: the forward budget (``solver.max_iter``).
    n_states: number of states, in ``[1, max_iter]``.

  Returns:
    The indices for :func:`fixed_point_states`.

  Raises:
    ValueError: unless both are integers with ``1 <= n_states <= max_iter``.
  """
  for name, value in (("max_iter", max_iter), ("n_states", n_states)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"correction_indices: {name} must be an integer >= 1, got "
                       f"{value!r}")
  if n_states > max_iter:
    raise ValueError(f"correction_indices: n_states must be <= max_iter={max_iter}, "
                     f"got {n_states}")
  delta = max_iter // n_states
  return tuple(int(max_iter - (n_states - 1 - j) * delta) for j in range(n_states))

"""Fixed-point correction: states of one solve, their gradients, the weighted loss.

The oracles are independent solves: state ``j`` must be what ``jdeq.fixed_point``
returns with ``budget=indices[j]``, and the gradient of the correction loss must be
the weighted sum of the gradients of those solves, each with its own mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import nn
from jdeq._src.solvers import base
from jdeq.models import cells
from tests import helpers

ANDERSON = jdeq.Anderson(max_iter=40, tol=1e-12, stop_mode="abs", m=5)
PICARD = jdeq.FixedPointIteration(max_iter=40, tol=1e-12, stop_mode="abs", damping=0.8)
BACKWARD = jdeq.IFT(jdeq.Anderson(max_iter=60, tol=1e-13, stop_mode="abs"))
INDICES = (1, 3, 8, 20)


@pytest.fixture
def tanh(x64):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(0), dim=16, batch=6,
                                      contraction=0.9)
  return f, jnp.zeros_like(x), params, x


@pytest.fixture
def two_resolutions(x64):
  f, params, x, z0 = helpers.two_resolution_problem(jax.random.PRNGKey(1))
  return f, z0, params, x


def _score(z):
  """A loss of one state that weighs every leaf differently."""
  return sum(jnp.sum(jnp.sin(leaf) * (1.0 + i))
             for i, leaf in enumerate(jax.tree.leaves(z)))


# Two XLA programs (the recording solve and a solve with a budget) may round a few
# entries differently; the states agree to a few ulps, not bit for bit.
ATOL = 1e-13


def _assert_trees_close(actual, expected, atol=ATOL):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=0, atol=atol)


# (1) the states are the solver's estimates at those budgets ------------------------


@pytest.mark.parametrize("solver", [
    ANDERSON, PICARD, jdeq.Broyden(max_iter=40, tol=1e-12, stop_mode="abs", memory=10)],
    ids=["anderson", "picard", "broyden"])
def test_recorded_iterates_are_the_solves_with_those_budgets(tanh, solver):
  f, z0, params, x = tanh
  fn = lambda z: f(z, params, x)
  _, _, recorded = jax.jit(
      lambda z: base.iterate_recording(solver, fn, z, INDICES))(z0)
  with_budget = jax.jit(lambda b: base.iterate(solver, fn, z0, budget=b))
  for j, i in enumerate(INDICES):
    expected, _ = with_budget(i)
    _assert_trees_close(recorded[j], expected)
  np.testing.assert_array_equal(recorded[0], z0)  # one evaluation: z0 itself


@pytest.mark.parametrize("problem_name", ["tanh", "two_resolutions"])
def test_states_match_fixed_point_with_budget(problem_name, request):
  f, z0, params, x = request.getfixturevalue(problem_name)
  states, stats = jax.jit(lambda p, x_: jdeq.fixed_point_states(
      f, z0, p, x_, indices=INDICES, solver=ANDERSON, grad=jdeq.JFB()))(params, x)
  assert len(states) == len(INDICES)
  with_budget = jax.jit(lambda b: jdeq.fixed_point(
      f, z0, params, x, solver=ANDERSON, grad=jdeq.JFB(), budget=b))
  for state, i in zip(states, INDICES):
    _assert_trees_close(state, with_budget(i)[0])
  # The solve stops at the last index: its statistics are those of that budget.
  _, expected_stats = with_budget(INDICES[-1])
  np.testing.assert_array_equal(stats.nstep, expected_stats.nstep)
  np.testing.assert_allclose(stats.abs_residual, expected_stats.abs_residual,
                             rtol=0, atol=ATOL)


def test_samples_that_stopped_early_contribute_their_final_state(tanh):
  """Per-sample stopping: a converged sample's later states are its final state."""
  f, z0, params, x = tanh
  # Half the batch has a tiny injection and converges in a few steps, the other
  # half needs most of the budget.
  x = x * jnp.where(jnp.arange(x.shape[0]) % 2 == 0, 1e-6, 1.0)[:, None]
  solver = jdeq.Anderson(max_iter=40, tol=1e-9, stop_mode="abs", m=5)
  indices = (2, 6, 12, 30, 40)
  fn = lambda z: f(z, params, x)
  final, stats, recorded = jax.jit(
      lambda z: base.iterate_recording(solver, fn, z, indices))(z0)
  fast = np.asarray(stats.nstep) < indices[2]
  assert fast.any() and not fast.all(), stats.nstep
  with_budget = jax.jit(lambda b: base.iterate(solver, fn, z0, budget=b))
  for j, i in enumerate(indices):
    expected, _ = with_budget(i)
    _assert_trees_close(recorded[j], expected)
    if i > int(np.max(stats.nstep[fast])):
      np.testing.assert_array_equal(recorded[j][fast], final[fast])
  # Every sample converged before the last indices: the loop ended early, and the
  # slots it never reached hold the final estimate.
  assert int(np.max(stats.nstep)) < indices[-1]
  np.testing.assert_array_equal(recorded[-1], final)
  np.testing.assert_array_equal(recorded[-2], final)


def test_a_traced_budget_caps_the_states(tanh):
  f, z0, params, x = tanh

  @jax.jit
  def run(budget):
    return jdeq.fixed_point_states(f, z0, params, x, indices=INDICES,
                                   solver=ANDERSON, budget=budget)

  states, stats = run(jnp.asarray(5))
  np.testing.assert_array_equal(stats.nstep, 5)
  with_budget = jax.jit(lambda b: jdeq.fixed_point(
      f, z0, params, x, solver=ANDERSON, grad=jdeq.JFB(), budget=b)[0])
  for state, i in zip(states, INDICES):
    _assert_trees_close(state, with_budget(min(i, 5)))


# (2) the gradient is the weighted sum of independent per-state gradients ---------

MIXED_MODES = (jdeq.JFB(), jdeq.Phantom(k=3, damping=0.5),
               jdeq.Phantom(k=2, damping=0.7, neumann=True), BACKWARD)


def _correction_loss(f, z0, grad, decay, params, x):
  states, _ = jdeq.fixed_point_states(f, z0, params, x, indices=INDICES,
                                      solver=ANDERSON, grad=grad)
  return jdeq.correction_loss([_score(s) for s in states], decay)


def _per_state_gradients(f, z0, modes, params, x):
  """The gradient of each state's loss, each from its own budget-``i`` solve."""
  def state_loss(i, mode, params, x):
    z, _ = jdeq.fixed_point(f, z0, params, x, solver=ANDERSON, grad=mode, budget=i)
    return _score(z)

  return [jax.value_and_grad(functools.partial(state_loss, i, mode), argnums=(0, 1))(
      params, x) for i, mode in zip(INDICES, modes)]


def _weighted(per_state, decay):
  n = len(per_state)
  return jax.tree.map(lambda *leaves: sum(decay ** (n - 1 - j) * leaf
                                          for j, leaf in enumerate(leaves)), *per_state)


@pytest.mark.parametrize("problem_name", ["tanh", "two_resolutions"])
@pytest.mark.parametrize("modes", [
    MIXED_MODES,
    (jdeq.Phantom(k=4, damping=0.6),) * len(INDICES),
], ids=["jfb_phantom_neumann_ift", "phantom"])
def test_gradient_is_the_weighted_sum_of_per_state_gradients(problem_name, modes,
                                                             request):
  f, z0, params, x = request.getfixturevalue(problem_name)
  grad = modes if len(set(modes)) > 1 else modes[0]  # one mode for all, or one each
  value, actual = jax.jit(jax.value_and_grad(
      functools.partial(_correction_loss, f, z0, grad, 0.8), argnums=(0, 1)))(
          params, x)
  per_state = jax.jit(functools.partial(_per_state_gradients, f, z0, modes))(params, x)
  expected_value, expected = _weighted(per_state, 0.8)
  np.testing.assert_allclose(value, expected_value, rtol=1e-12)
  assert helpers.relative_error(actual, expected) < 1e-10
  # The oracle is not vacuous: the earlier states change the gradient noticeably,
  # and a wrong weighting would be caught.
  final_only = per_state[-1][1]
  assert helpers.relative_error(actual, final_only) > 1e-2
  assert helpers.relative_error(actual, _weighted(per_state, 0.7)[1]) > 1e-3


def test_backward_probe_reports_the_last_states_ift_solve(tanh):
  f, z0, params, x = tanh

  def loss(params, probe):
    states, _ = jdeq.fixed_point_states(
        f, z0, params, x, indices=INDICES, solver=ANDERSON,
        grad=(jdeq.JFB(),) * 3 + (BACKWARD,), backward_probe=probe)
    return jdeq.correction_loss([_score(s) for s in states])

  probe = jdeq.backward_stats_probe(x.shape[0], jnp.float64)
  _, probe_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probe)
  stats = jdeq.backward_stats(probe_grad)
  assert np.all(stats.converged) and np.all(stats.nstep > 2)


# (3) one index at the full budget is the plain gradient mode ---------------------


@pytest.mark.parametrize("mode", [jdeq.JFB(), jdeq.Phantom(k=5, damping=0.5),
                                  jdeq.Phantom(k=3, neumann=True), BACKWARD],
                         ids=["jfb", "phantom", "phantom_neumann", "ift"])
def test_a_single_final_index_is_the_plain_gradient(tanh, mode):
  f, z0, params, x = tanh

  def corrected(params, x):
    states, _ = jdeq.fixed_point_states(f, z0, params, x, solver=ANDERSON, grad=mode,
                                        indices=(ANDERSON.max_iter,))
    return jdeq.correction_loss([_score(states[0])], decay=0.8)

  def plain(params, x):
    z, _ = jdeq.fixed_point(f, z0, params, x, solver=ANDERSON, grad=mode)
    return _score(z)

  value, actual = jax.value_and_grad(corrected, argnums=(0, 1))(params, x)
  expected_value, expected = jax.value_and_grad(plain, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-13)
  assert helpers.relative_error(actual, expected) < 1e-12


# (4) clear errors -----------------------------------------------------------------


@pytest.mark.parametrize("indices, match", [
    ((), "non-empty"),
    (5, "non-empty tuple"),
    ((0, 5), r"in \[1, max_iter=40\]"),
    ((5, 41), r"in \[1, max_iter=40\]"),
    ((5, 5), "strictly increasing"),
    ((8, 3), "strictly increasing"),
    ((2.0, 5), "static Python ints"),
    ((True, 5), "static Python ints"),
    ((jnp.asarray(3), 5), "static Python ints"),
])
def test_bad_indices_are_refused(tanh, indices, match):
  f, z0, params, x = tanh
  with pytest.raises(ValueError, match=match):
    jdeq.fixed_point_states(f, z0, params, x, indices=indices, solver=ANDERSON)


@pytest.mark.parametrize("grad, match", [
    ((jdeq.JFB(),) * 3, r"one per index \(4\)"),
    ((BACKWARD,) + (jdeq.JFB(),) * 3, "only available for the last state"),
    (BACKWARD, "only available for the last state"),
    (jdeq.Unrolled(5), "Phantom or JFB"),
    ("jfb", "Phantom or JFB"),
])
def test_bad_gradient_modes_are_refused(tanh, grad, match):
  f, z0, params, x = tanh
  with pytest.raises(ValueError, match=match):
    jdeq.fixed_point_states(f, z0, params, x, indices=INDICES, solver=ANDERSON,
                            grad=grad)


@pytest.mark.parametrize("decay", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.8", None])
def test_bad_decay_is_refused(decay):
  with pytest.raises(ValueError, match=r"decay must be a real number in \(0, 1\]"):
    jdeq.correction_loss([jnp.ones(()), jnp.ones(())], decay)


def test_bad_losses_are_refused():
  with pytest.raises(ValueError, match="must not be empty"):
    jdeq.correction_loss([])
  with pytest.raises(ValueError, match="same shape"):
    jdeq.correction_loss([jnp.ones(()), jnp.ones((3,))])
  with pytest.raises(ValueError, match="leading state axis"):
    jdeq.correction_loss(jnp.ones(()))


def test_correction_loss_weights():
  losses = [jnp.asarray(1.0), jnp.asarray(10.0), jnp.asarray(100.0)]
  np.testing.assert_allclose(jdeq.correction_loss(losses, 0.5), 0.25 + 5 + 100)
  np.testing.assert_allclose(jdeq.correction_loss(jnp.stack(losses), 1.0), 111.0)
  np.testing.assert_allclose(jdeq.correction_loss(losses[:1], 0.3), 1.0)
  per_sample = jdeq.correction_loss([jnp.ones(4), 2 * jnp.ones(4)], 0.8)
  np.testing.assert_allclose(per_sample, 2.8 * np.ones(4))


def test_correction_indices_spread_like_torchdeq():
  assert jdeq.correction_indices(40, 4) == (10, 20, 30, 40)
  assert jdeq.correction_indices(40, 3) == (14, 27, 40)
  assert jdeq.correction_indices(7, 1) == (7,)
  assert jdeq.correction_indices(5, 5) == (1, 2, 3, 4, 5)
  with pytest.raises(ValueError, match="n_states must be <= max_iter=5"):
    jdeq.correction_indices(5, 6)
  with pytest.raises(ValueError, match="n_states must be an integer >= 1"):
    jdeq.correction_indices(5, 0)


# (5) it jits once ------------------------------------------------------------------


def test_jits_without_recompiling(tanh):
  f, z0, params, x = tanh
  traces = []

  @jax.jit
  def step(params, x):
    traces.append(None)
    return jax.value_and_grad(
        functools.partial(_correction_loss, f, z0, MIXED_MODES, 0.8))(params, x)

  first = step(params, x)
  shifted = jax.tree.map(lambda p: 0.99 * p, params)
  second = step(shifted, x + 0.1)
  jax.block_until_ready(second)
  assert len(traces) == 1
  assert not np.allclose(first[0], second[0])


# the NNX layer ---------------------------------------------------------------------


def _layer(grad):
  cell = cells.MLPCell(6, 8, rngs=nnx.Rngs(0))
  return nn.DEQ(cell, solver=jdeq.Anderson(max_iter=30, tol=1e-6), grad=grad)


def test_deq_layer_states_end_at_its_own_output():
  x = jax.random.normal(jax.random.key(3), (3, 6))
  layer = _layer(jdeq.JFB())

  @nnx.jit
  def run(layer, x):
    states, aux = layer.fixed_point_states(x, indices=(5, 15, 30))
    z_star, call_aux = layer(x, train=True)
    loss = lambda m: jdeq.correction_loss(
        [jnp.sum(s ** 2) for s in m.fixed_point_states(x, indices=(5, 15, 30))[0]])
    return states, aux, z_star, call_aux, nnx.grad(loss)(layer)

  states, aux, z_star, call_aux, grads = run(layer, x)
  assert len(states) == 3 and states[-1].shape == x.shape
  np.testing.assert_allclose(states[-1], z_star, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(aux.stats.nstep, call_aux.stats.nstep)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_deq_layer_with_ift_uses_jfb_before_the_last_state(x64):
  x = jax.random.normal(jax.random.key(3), (3, 6), jnp.float64)
  ift = jdeq.IFT(jdeq.Anderson(max_iter=40, tol=1e-10, stop_mode="abs"))
  layer = _layer(ift)
  explicit = (jdeq.JFB(), jdeq.JFB(), ift)

  @nnx.jit
  def gradients(layer):
    def loss(layer, grad):
      states, _ = layer.fixed_point_states(x, indices=(5, 15, 30), grad=grad)
      return jdeq.correction_loss([jnp.sum(jnp.sin(s)) for s in states])
    return (nnx.grad(lambda m: loss(m, None))(layer),
            nnx.grad(lambda m: loss(m, explicit))(layer))

  default, expected = gradients(layer)
  assert helpers.relative_error(default, expected) < 1e-12

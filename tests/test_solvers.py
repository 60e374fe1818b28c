"""Forward solvers: convergence, per-sample decisions, failure reporting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq._src.solvers import broyden as broyden_module
from tests import helpers

SOLVERS = [
    jdeq.FixedPointIteration(max_iter=300, tol=1e-10),
    jdeq.Anderson(max_iter=300, tol=1e-10, m=6),
    jdeq.Broyden(max_iter=300, tol=1e-10, memory=20),
]
IDS = ["fixed_point_iteration", "anderson", "broyden"]


def _solve(solver, f, params, x, z0=None, **kwargs):
  z0 = jnp.zeros_like(x) if z0 is None else z0
  return jax.jit(lambda p, x: jdeq.fixed_point(f, z0, p, x, solver=solver, **kwargs))(
      params, x)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_converges_to_a_fixed_point(x64, solver):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(0))
  z, stats = _solve(solver, f, params, x)
  assert np.all(stats.converged) and not np.any(stats.diverged)
  assert np.all(stats.rel_residual <= 1e-10)
  np.testing.assert_allclose(f(z, params, x), z, atol=1e-9)
  assert stats.nstep.shape == (8,) and stats.nstep.dtype == jnp.int32


def test_acceleration_beats_plain_iteration(x64):
  """On a linear map with spectral radius 0.95 plain iteration needs ~450 steps."""
  a = jax.random.normal(jax.random.PRNGKey(1), (32, 32), jnp.float64)
  a = 0.95 * a / jnp.max(jnp.abs(jnp.linalg.eigvals(a)))
  b = jax.random.normal(jax.random.PRNGKey(2), (4, 32), jnp.float64)
  linear = lambda z, a, b: z @ a.T + b
  steps = {}
  for name, solver in zip(IDS, SOLVERS):
    solver = type(solver)(**{**solver.__dict__, "max_iter": 1000})
    _, stats = _solve(solver, linear, a, b)
    assert np.all(stats.converged)
    steps[name] = float(np.mean(stats.nstep))
  assert steps["fixed_point_iteration"] > 300
  assert steps["anderson"] < steps["fixed_point_iteration"] / 3
  assert steps["broyden"] < steps["fixed_point_iteration"] / 3


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_easy_samples_unaffected_by_a_slow_one(x64, solver):
  """Per-sample stopping: an easy sample gets the same result in any company."""
  a = jax.random.normal(jax.random.PRNGKey(2), (16, 16), jnp.float64)
  a = 0.5 * a / jnp.linalg.norm(a, ord=2)
  b = jax.random.normal(jax.random.PRNGKey(3), (4, 16), jnp.float64)
  gain = jnp.array([1.0, 1.0, 1.0, 1.99])[:, None]  # sample 3: contraction ~0.995

  def slow_f(z, gain, b):
    return jnp.tanh(gain * (z @ a.T) + b)

  z_all, s_all = _solve(solver, slow_f, gain, b)
  assert np.all(s_all.converged)
  assert s_all.nstep[3] > s_all.nstep[:3].max()
  for i in range(3):
    z_one, s_one = _solve(solver, slow_f, gain[i:i + 1], b[i:i + 1])
    assert int(s_one.nstep[0]) == int(s_all.nstep[i])
    np.testing.assert_allclose(z_one[0], z_all[i], rtol=1e-12, atol=1e-12)


def test_pytree_state(x64):
  f, params, x, z0 = helpers.two_resolution_problem(jax.random.PRNGKey(3))
  z, stats = jdeq.fixed_point(f, z0, params, x, solver=jdeq.Anderson(100, 1e-10))
  assert [a.shape for a in z] == [(4, 8, 2), (4, 4, 3)]
  assert np.all(stats.converged)
  for a, b in zip(f(z, params, x), z):
    np.testing.assert_allclose(a, b, atol=1e-9)


def test_jit_vmap_and_loop_is_a_while_loop():
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(4), dtype=jnp.float32)
  run = lambda x: jdeq.fixed_point(f, jnp.zeros_like(x), params, x,
                                   solver=jdeq.Anderson(40, 1e-5))
  jaxpr = str(jax.make_jaxpr(run)(x))
  assert "while[" in jaxpr
  # 40 unrolled iterations would put dozens of tanh in the top-level program.
  assert jaxpr.count("tanh") < 5
  stacked = jnp.stack([x, 2 * x])
  z_v, stats_v = jax.jit(jax.vmap(run))(stacked)
  z_0, _ = jax.jit(run)(x)
  assert z_v.shape == (2,) + x.shape and stats_v.nstep.shape == (2, x.shape[0])
  np.testing.assert_allclose(z_v[0], z_0, atol=1e-5)


def test_anderson_survives_a_singular_history(x64):
  """Collinear and vanishing residuals make the unregularized system singular."""
  direction = jnp.ones((3, 5))

  def collinear(z, c):  # every residual is a multiple of `direction`
    return 0.5 * z + c * direction

  z, stats = jdeq.fixed_point(collinear, jnp.zeros((3, 5)), jnp.float64(1.0),
                              solver=jdeq.Anderson(50, 1e-12, ridge=1e-12))
  assert np.all(np.isfinite(z)) and np.all(stats.converged)
  identity = lambda z, c: z * c  # g = 0 from the start: Gram matrix all zero
  z, stats = jdeq.fixed_point(identity, jnp.ones((3, 5)), jnp.float64(1.0),
                              solver=jdeq.Anderson(10, 1e-12))
  assert np.all(np.isfinite(z)) and np.all(stats.converged)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_map_without_fixed_point_never_converges(solver):
  no_root = lambda z, a: z + z * z + a  # g(z) = z² + 1 > 0
  z, stats = jdeq.fixed_point(no_root, jnp.zeros((4, 3)), jnp.float32(1.0),
                              solver=solver)
  assert not np.any(stats.converged)
  assert np.all(np.isfinite(z))


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_exploding_iterates_are_flagged_diverged(solver):
  exploding = lambda z, a: z + a * jnp.exp(z * z)
  # Starts from which every solver explodes within a few steps: from a start near
  # 0, Anderson's extrapolation can wander for a hundred steps before it does, and
  # when depends on float rounding.
  z0 = jnp.array([[-0.5], [1.0]]) * jnp.ones((2, 3))
  z, stats = jdeq.fixed_point(exploding, z0, jnp.float32(1.0), solver=solver)
  assert np.all(stats.diverged) and not np.any(stats.converged)
  assert np.all(np.isfinite(z))
  assert np.all(stats.nstep < solver.max_iter)  # stopped early, budget not wasted


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_nan_producing_sample_returns_its_best_finite_iterate(solver):
  x = jnp.array([[0.5], [-4.0]])
  f = lambda z, x: jnp.sqrt(x + 0.5 * z)  # sample 1: sqrt of a negative number
  z, stats = jdeq.fixed_point(f, jnp.zeros((2, 1)), x, solver=solver)
  assert bool(stats.converged[0]) and not bool(stats.diverged[0])
  assert bool(stats.diverged[1]) and not bool(stats.converged[1])
  assert np.all(np.isfinite(z))


def test_budget_is_dynamic_and_traces_are_recorded():
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(5), dtype=jnp.float32)
  solver = jdeq.FixedPointIteration(60, 1e-7, record_trace=True)
  run = jax.jit(lambda budget: jdeq.fixed_point(
      f, jnp.zeros_like(x), params, x, solver=solver, budget=budget))
  _, short = run(jnp.int32(5))
  _, full = run(jnp.int32(60))
  assert np.all(short.nstep == 5) and not np.any(short.converged)
  assert np.all(full.nstep > 5)
  assert full.trace.shape == (8, 60)
  nstep = np.asarray(full.nstep)
  for i in range(8):  # decreasing overall, constant after the sample stopped
    assert full.trace[i, nstep[i] - 1] < full.trace[i, 0]
    assert np.all(full.trace[i, nstep[i]:] == full.trace[i, nstep[i] - 1])


def test_stop_modes_measure_different_residuals(x64):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(6))
  z_abs, by_abs = _solve(jdeq.FixedPointIteration(500, 1e-6, "abs"), f, params, x)
  z_rel, by_rel = _solve(jdeq.FixedPointIteration(500, 1e-6, "rel"), f, params, x)
  assert np.all(by_abs.abs_residual <= 1e-6) and np.all(by_abs.converged)
  assert np.all(by_rel.rel_residual <= 1e-6) and np.all(by_rel.converged)
  for z, stats in ((z_abs, by_abs), (z_rel, by_rel)):  # the residuals of the result
    fz = f(z, params, x)
    np.testing.assert_allclose(stats.abs_residual, np.linalg.norm(fz - z, axis=1),
                               rtol=1e-6)
    np.testing.assert_allclose(stats.rel_residual, stats.abs_residual
                               / np.linalg.norm(fz, axis=1), rtol=1e-12)
  # Here ‖f(z*)‖ > 1, so the relative test is the looser one and stops sooner.
  assert np.all(np.linalg.norm(f(z_rel, params, x), axis=1) > 1)
  assert np.all(by_rel.nstep < by_abs.nstep)
  assert np.all(by_rel.abs_residual > 1e-6)  # not converged by the abs measure


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_blow_up_with_bounded_relative_residual_is_flagged(x64, solver):
  """``f(z) = 10 Q z + b`` (Q orthogonal): ‖f(z) − z‖/‖f(z)‖ stays near 1 while
  every solver's iterates grow by orders of magnitude (float64, so nothing
  overflows into a non-finite value). Under ``stop_mode="abs"`` the residual ratio
  test already caught this; under ``"rel"`` only the growth test does."""
  dim = 16
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (dim, dim),
                                         jnp.float64))
  b = jax.random.normal(jax.random.PRNGKey(1), (2, dim), jnp.float64)
  solver = type(solver)(**{**solver.__dict__, "max_iter": 50, "tol": 1e-3,
                           "stop_mode": "rel"})
  z, stats = _solve(solver, lambda z, q, b: 10 * z @ q.T + b, q, b)
  assert np.all(stats.diverged) and not np.any(stats.converged), stats
  assert np.all(stats.nstep < solver.max_iter)  # stopped, the budget not spent
  assert np.all(np.isfinite(z))
  assert np.all(stats.rel_residual < 1.5)  # the ratio alone would never tell


def test_start_far_below_the_state_scale_is_not_divergence():
  """Plain iteration from ``z₀ = 0`` with an injection of 1e-6 settles at an O(1)
  equilibrium: the growth of ‖z‖ by ~10⁶ on the way is not a blow-up (the growth
  test's scale has the floor √D)."""
  def f(z, gain, x):  # expansive at 0: the stable fixed points are near ±0.957
    return jnp.tanh(gain * z + x)

  x = jnp.full((2, 4), 1e-6, jnp.float32)
  z, stats = _solve(jdeq.FixedPointIteration(300, 1e-5), f, jnp.float32(2.0), x)
  assert np.all(stats.converged) and not np.any(stats.diverged)
  np.testing.assert_allclose(z, 0.9575, atol=1e-3)


def test_batch_scope_stops_and_chooses_the_iterate_for_the_whole_batch(x64):
  """stop_scope="batch" against a NumPy oracle of plain iteration's raw iterates.

  Samples contract at different rates, so per-sample stopping spends different
  counts; the batch scope must stop every sample at the first iterate whose batch
  residual ‖f(Z) − Z‖_F / ‖f(Z)‖_F meets the tolerance and return that iterate.
  """
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (16, 16), jnp.float64))
  a = a / np.linalg.norm(a, ord=2)
  b = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, 16), jnp.float64))
  gain = np.array([0.2, 0.5, 0.8, 0.9])[:, None]
  f = lambda z, gain, b: jnp.tanh(gain * (z @ a.T) + b)
  tol = 1e-6
  iterates = [np.zeros_like(b)]
  while True:
    image = np.tanh(gain * (iterates[-1] @ a.T) + b)
    if np.linalg.norm(image - iterates[-1]) / np.linalg.norm(image) <= tol:
      break
    iterates.append(image)
  solver = jdeq.FixedPointIteration(max_iter=200, tol=tol, stop_mode="rel")
  z_batch, s_batch = _solve(jdeq.FixedPointIteration(
      max_iter=200, tol=tol, stop_mode="rel", stop_scope="batch"), f, gain, b)
  _, s_sample = _solve(solver, f, gain, b)
  assert len(set(np.asarray(s_sample.nstep).tolist())) > 1  # the scopes really differ
  np.testing.assert_array_equal(s_batch.nstep, np.full(4, len(iterates)))
  np.testing.assert_allclose(z_batch, iterates[-1], rtol=1e-13, atol=1e-14)
  assert np.all(s_batch.converged)
  # Per-sample residuals are still reported, at the batch's chosen iterate.
  image = np.tanh(gain * (iterates[-1] @ a.T) + b)
  np.testing.assert_allclose(s_batch.abs_residual,
                             np.linalg.norm(image - iterates[-1], axis=1), rtol=1e-8,
                             atol=1e-15)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_batch_scope_returns_the_lowest_batch_residual_step(x64, solver):
  """With a budget too small to converge, the batch scope returns the iterate of the
  step whose batch residual was lowest: re-running with that budget gives it back."""
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(0))
  kwargs = {**solver.__dict__, "max_iter": 6, "stop_scope": "batch",
            "record_trace": True}
  batch_solver = type(solver)(**kwargs)
  z, stats = _solve(batch_solver, f, params, x)
  trace = np.asarray(stats.trace[0])  # the batch residual after each evaluation
  assert np.all(np.asarray(stats.trace) == trace[None])
  best = int(np.argmin(trace)) + 1
  z_best, _ = _solve(batch_solver, f, params, x, budget=best)
  np.testing.assert_allclose(z, z_best, rtol=1e-12, atol=1e-12)



def _dense_good_broyden(residual, z0, iterations, memory):
  """Good Broyden with an explicit (D, D) inverse-Jacobian estimate, for one sample:
  the oracle of the low-rank, block-stored solver. Returns its iterates."""
  z, h = z0, -np.eye(z0.size)
  g = residual(z)
  iterates, pairs, previous = [z], 0, None
  for _ in range(iterations - 1):
    if previous is not None:
      s, y = z - previous[0], g - previous[1]
      hy = h @ y
      denominator = s @ hy
      size = np.linalg.norm(s) * np.linalg.norm(hy)
      update = np.zeros_like(h)
      if size > 0 and abs(denominator) > 1e-6 * size:
        update = np.outer(s - hy, s @ h) / denominator
      pairs += 1
      # A full memory restarts the estimate from −I before the new pair goes in.
      restart = pairs > 1 and (pairs - 1) % memory == 0
      h = (-np.eye(z.size) if restart else h) + update
    previous = (z, g)
    z = z - h @ g
    g = residual(z)
    iterates.append(z)
  return np.asarray(iterates)


@pytest.mark.parametrize("blocked", [True, False], ids=["blocks", "one_buffer"])
@pytest.mark.parametrize("memory", [1, 4, 6, 9, 30])
def test_broyden_matches_a_dense_inverse_jacobian_oracle(x64, monkeypatch, memory,
                                                         blocked):
  """Large pair buffers are stored in blocks of slots, and the products read only the
  live ones: every budget must still return the dense good-Broyden iterate of lowest
  residual, across restarts (memory < budget) and block boundaries."""
  if blocked:  # this problem's buffers are small: store them in blocks all the same
    monkeypatch.setattr(broyden_module, "_BLOCKED_BUFFER_BYTES", 0)
  dim, iterations, batch = 12, 14, 3
  w = np.asarray(1.3 * jax.random.normal(jax.random.PRNGKey(3), (dim, dim))) / np.sqrt(dim)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (batch, dim)))
  f = lambda z, params, x: jnp.tanh(z @ w.T + x)
  solver = jdeq.Broyden(max_iter=iterations, tol=1e-30, memory=memory)
  solve = jax.jit(lambda x, budget: jdeq.fixed_point(f, jnp.zeros_like(x), None, x,
                                                     solver=solver, budget=budget))
  for i in range(batch):
    image = lambda z: np.tanh(w @ z + x[i])
    iterates = _dense_good_broyden(lambda z: image(z) - z, np.zeros(dim), iterations,
                                   memory)
    relative = [np.linalg.norm(image(z) - z) / np.linalg.norm(image(z)) for z in iterates]
    for budget in (2, 5, 9, iterations):
      z, _ = solve(jnp.asarray(x), jnp.asarray(budget))
      best = int(np.argmin(relative[:budget]))
      np.testing.assert_allclose(z[i], iterates[best], rtol=1e-9, atol=1e-12)

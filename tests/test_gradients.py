"""Gradients through the equilibrium, against independent oracles (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from tests import helpers

FORWARD = jdeq.Anderson(max_iter=300, tol=1e-14, stop_mode="abs", m=6)
TIGHT_IFT = jdeq.IFT(jdeq.Anderson(max_iter=300, tol=1e-14, stop_mode="abs"))


def _loss(f, z0, grad, params, x):
  z, _ = jdeq.fixed_point(f, z0, params, x, solver=FORWARD, grad=grad)
  return sum(jnp.sum(jnp.sin(leaf) * (1.0 + i)) for i, leaf in
             enumerate(jax.tree.leaves(z)))


@pytest.fixture
def tanh(x64):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(0), dim=32, batch=8)
  return f, jnp.zeros_like(x), params, x


@pytest.fixture
def two_resolutions(x64):
  f, params, x, z0 = helpers.two_resolution_problem(jax.random.PRNGKey(1))
  return f, z0, params, x


def _ift_gradient(problem, grad=TIGHT_IFT):
  f, z0, params, x = problem
  return jax.jit(jax.grad(functools.partial(_loss, f, z0, grad), argnums=(0, 1)))(
      params, x)


@pytest.mark.parametrize("problem_name", ["tanh", "two_resolutions"])
def test_ift_matches_central_differences(problem_name, request):
  problem = request.getfixturevalue(problem_name)
  f, z0, params, x = problem
  loss = jax.jit(lambda px: _loss(f, z0, TIGHT_IFT, *px))
  gradient = _ift_gradient(problem)
  # Directional derivatives along random directions (as jax.test_util.check_grads
  # does): each is a central difference of the full loss.
  keys = jax.random.split(jax.random.PRNGKey(11), 6)
  directions = [helpers.random_like(k, (params, x)) for k in keys]
  expected = jnp.array([helpers.directional_difference(loss, (params, x), d, 1e-5)
                        for d in directions])
  actual = jnp.array([helpers.tree_vdot(gradient, d) for d in directions])
  assert helpers.relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("problem_name", ["tanh", "two_resolutions"])
def test_ift_matches_500_unrolled_iterations(problem_name, request):
  problem = request.getfixturevalue(problem_name)
  unrolled = _ift_gradient(problem, jdeq.Unrolled(500))
  assert helpers.relative_error(_ift_gradient(problem), unrolled) < 1e-6


@pytest.mark.parametrize("problem_name", ["tanh", "two_resolutions"])
def test_ift_matches_jaxopt_implicit_differentiation(problem_name, request):
  jaxopt = pytest.importorskip("jaxopt")
  f, z0, params, x = request.getfixturevalue(problem_name)

  def jaxopt_loss(params, x):
    def fixed_point_fun(z, params, x):
      return f(z, params, x)

    @jaxopt.implicit_diff.custom_fixed_point(
        fixed_point_fun, solve=functools.partial(jaxopt.linear_solve.solve_gmres,
                                                 tol=1e-14, maxiter=200))
    def solve(z_init, params, x):
      return jax.lax.fori_loop(0, 400, lambda _, z: f(z, params, x), z_init)

    z = solve(z0, params, x)
    return sum(jnp.sum(jnp.sin(leaf) * (1.0 + i)) for i, leaf in
               enumerate(jax.tree.leaves(z)))

  expected = jax.jit(jax.grad(jaxopt_loss, argnums=(0, 1)))(params, x)
  actual = _ift_gradient((f, z0, params, x))
  assert helpers.relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("backward", [
    jdeq.FixedPointIteration(1000, 1e-14, "abs"),
    jdeq.Broyden(300, 1e-14, "abs", memory=60),
    jdeq.Krylov("gmres", 200, 1e-13),
    jdeq.Krylov("normal_cg", 400, 1e-13),
], ids=["fixed_point_iteration", "broyden", "gmres", "normal_cg"])
def test_every_backward_solver_agrees(tanh, backward):
  if isinstance(backward, jdeq.Krylov):  # jdeq's Krylov solvers are jaxopt's
    pytest.importorskip("jaxopt")
  actual = _ift_gradient(tanh, jdeq.IFT(backward))
  assert helpers.relative_error(actual, _ift_gradient(tanh)) < 1e-6


@pytest.mark.parametrize("neumann", [False, True])
def test_phantom_with_many_steps_approaches_ift(tanh, neumann):
  phantom = _ift_gradient(tanh, jdeq.Phantom(k=200, damping=0.5, neumann=neumann))
  assert helpers.relative_error(phantom, _ift_gradient(tanh)) < 1e-4


def test_short_phantom_and_jfb_are_descent_directions(tanh):
  """Cheap gradients are approximations: correlated with IFT but not equal to it."""
  ift = _ift_gradient(tanh)[0]
  jfb = _ift_gradient(tanh, jdeq.JFB())[0]
  phantom = _ift_gradient(tanh, jdeq.Phantom(k=5, damping=0.5))[0]
  # On this problem (‖W‖₂ = 0.9) JFB's cosine is about 0.86; it must stay a clear
  # ascent/descent direction but must not be mistaken for the exact gradient.
  assert 0.6 < helpers.cosine_similarity(jfb, ift) < 0.999
  assert helpers.cosine_similarity(phantom, ift) > helpers.cosine_similarity(jfb, ift)


def test_forward_mode_jvp_matches_finite_differences(tanh):
  f, z0, params, x = tanh
  direction = helpers.random_like(jax.random.PRNGKey(7), params)
  loss = lambda p: _loss(f, z0, TIGHT_IFT, p, x)
  _, tangent = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(params, direction)
  expected = helpers.directional_difference(loss, params, direction, eps=1e-5)
  assert abs(float(tangent) - float(expected)) < 1e-6 * abs(float(expected))
  # and forward mode agrees with reverse mode
  reverse = jax.grad(loss)(params)
  dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(reverse),
                                           jax.tree.leaves(direction)))
  np.testing.assert_allclose(tangent, dot, rtol=1e-9)


def test_backward_statistics_are_observable(tanh):
  f, z0, params, x = tanh

  def loss(params, probe, backward_solver=jdeq.Anderson(40, 1e-9, "abs")):
    z, _ = jdeq.fixed_point(f, z0, params, x, solver=FORWARD,
                            grad=jdeq.IFT(backward_solver), backward_probe=probe)
    return jnp.sum(jnp.sin(z))

  probe = jdeq.backward_stats_probe(x.shape[0], jnp.float64)
  grads, probe_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probe)
  stats = jdeq.backward_stats(probe_grad)
  assert stats.nstep.shape == (8,)
  assert np.all(stats.converged) and np.all(stats.abs_residual <= 1e-9)
  assert np.all((stats.nstep > 2) & (stats.nstep < 40))
  # the probe does not change the parameter gradient
  plain = jax.grad(lambda p: loss(p, probe))(params)
  assert helpers.relative_error(grads, plain) < 1e-12
  # a budget too small to converge is reported, not hidden
  starved = functools.partial(loss, backward_solver=jdeq.Anderson(3, 1e-12, "abs"))
  _, probe_grad = jax.grad(starved, argnums=(0, 1))(params, probe)
  starved_stats = jdeq.backward_stats(probe_grad)
  assert not np.any(starved_stats.converged) and np.all(starved_stats.nstep == 3)


def _temp_bytes(fn, *args) -> int:
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_ift_memory_is_constant_in_forward_iterations():
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(3), dim=64, batch=32,
                                      dtype=jnp.float32)
  z0 = jnp.zeros_like(x)

  def value_and_grad(solver, grad):
    def loss(params):
      z, _ = jdeq.fixed_point(f, z0, params, x, solver=solver, grad=grad)
      return jnp.sum(z ** 2)
    return jax.value_and_grad(loss)

  ift = jdeq.IFT(jdeq.Anderson(20, 1e-6))
  ift_10 = _temp_bytes(value_and_grad(jdeq.Anderson(10, 1e-6), ift), params)
  ift_100 = _temp_bytes(value_and_grad(jdeq.Anderson(100, 1e-6), ift), params)
  assert abs(ift_100 - ift_10) <= 0.1 * ift_10
  unrolled_10 = _temp_bytes(value_and_grad(FORWARD, jdeq.Unrolled(10)), params)
  unrolled_100 = _temp_bytes(value_and_grad(FORWARD, jdeq.Unrolled(100)), params)
  # 90 more stored activations of (32, 64) float32 each
  assert unrolled_100 - unrolled_10 >= 90 * 32 * 64 * 4


@pytest.mark.parametrize("make_mode", [
    lambda unroll: jdeq.Unrolled(steps=7, unroll=unroll),
    lambda unroll: jdeq.Phantom(k=7, damping=0.6, unroll=unroll),
    lambda unroll: jdeq.Phantom(k=7, damping=0.6, neumann=True, unroll=unroll),
])
def test_unroll_changes_the_program_not_the_values(tanh, make_mode):
  """Written out, in blocks of 3, or rolled: the same iterates, gradients and tangents."""
  f, z0, params, x = tanh
  results = []
  for unroll in (True, 3, 1):
    mode = make_mode(unroll)
    loss = functools.partial(_loss, f, z0, mode)
    direction = helpers.random_like(jax.random.PRNGKey(3), params)
    value, tangent = jax.jit(lambda p, d: jax.jvp(lambda q: loss(q, x), (p,), (d,)))(
        params, direction)
    results.append((value, tangent, _ift_gradient(tanh, mode)))
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("unroll, loops", [(None, False), (1, True), (4, True)])
def test_unrolled_default_writes_short_loops_out(tanh, unroll, loops):
  """The default writes MDEQ's pretraining depths out: no loop left in the program."""
  f, z0, params, x = tanh
  mode = jdeq.Unrolled(steps=10) if unroll is None else jdeq.Unrolled(steps=10, unroll=unroll)
  text = jax.jit(jax.grad(functools.partial(_loss, f, z0, mode))).lower(
      params, x).as_text()
  assert ("stablehlo.while" in text) == loops

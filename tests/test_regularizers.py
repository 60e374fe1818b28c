"""Hutchinson Jacobian penalty and power-iteration spectral radius."""

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from tests import helpers


def _exact_jacobians(f, z, *args):
  """Per-sample Jacobians ``(B, d, d)`` of a map on ``(B, d)`` states."""
  per_sample = lambda zi, xi: f(zi[None], args[0], xi[None])[0]
  return jax.vmap(jax.jacfwd(per_sample))(z, args[1])


def test_hutchinson_estimate_is_unbiased(x64):
  """The mean of 2000 single-probe estimates is within 3% of the exact value.

  The relative standard deviation of one probe is sqrt(2 Σσ⁴) / Σσ²; with an
  orthogonal W (σ spread evenly, d = 32) it is about 0.25, so the mean of 2000 has
  about 0.6%: a 3% bound is five standard deviations, not luck.
  """
  dim, batch = 32, 3
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (dim, dim)))
  params = (0.8 * q, jnp.eye(dim))
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, dim))
  f = lambda z, params, x: jnp.tanh(z @ params[0].T + x @ params[1].T)
  z_star, _ = jdeq.fixed_point(f, jnp.zeros_like(x), params, x)
  exact = jnp.sum(_exact_jacobians(f, z_star, params, x) ** 2, axis=(1, 2)) / dim
  keys = jax.random.split(jax.random.PRNGKey(2), 2000)
  estimates = jax.jit(jax.vmap(lambda key: jdeq.jacobian_fro_sq(
      f, z_star, params, x, key=key)))(keys)
  np.testing.assert_array_less(jnp.abs(estimates.mean(0) - exact), 0.03 * exact)
  # a single probe is a noisy, positive estimate of the same quantity
  assert estimates.shape == (2000, batch) and np.all(estimates > 0)
  assert np.std(estimates[:, 0]) > 0.1 * exact[0]
  # several probes in one call average the same way
  averaged = jdeq.jacobian_fro_sq(f, z_star, params, x, key=keys[0], num_probes=2000)
  np.testing.assert_array_less(jnp.abs(averaged - exact), 0.03 * exact)


def test_hutchinson_penalty_is_differentiable_in_parameters(x64):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(3), dim=5, batch=2)
  z_star, _ = jdeq.fixed_point(f, jnp.zeros_like(x), params, x)
  z_star = jax.lax.stop_gradient(z_star)
  key = jax.random.PRNGKey(4)
  penalty = lambda p: jnp.sum(jdeq.jacobian_fro_sq(f, z_star, p, x, key=key,
                                                   num_probes=3))
  direction = helpers.random_like(jax.random.PRNGKey(5), params)
  analytic = helpers.tree_vdot(jax.grad(penalty)(params), direction)
  numeric = helpers.directional_difference(penalty, params, direction)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-7)


def test_spectral_radius_matches_exact_eigenvalues(x64):
  f, params, x = helpers.tanh_problem(jax.random.PRNGKey(6), dim=12, batch=4,
                                      contraction=0.9)
  z_star, _ = jdeq.fixed_point(f, jnp.zeros_like(x), params, x)
  exact = jnp.max(jnp.abs(jnp.linalg.eigvals(
      _exact_jacobians(f, z_star, params, x))), axis=1)
  estimate = jdeq.spectral_radius(f, z_star, params, x, key=jax.random.PRNGKey(7),
                                  iters=400)
  np.testing.assert_allclose(estimate, exact, rtol=0.02)


def test_spectral_radius_of_a_rotation_pair():
  """A complex dominant pair: ‖Jv‖ oscillates, the geometric mean does not."""
  with jax.enable_x64(True):
    theta, r = 0.7, 0.8
    rotation = r * jnp.array([[jnp.cos(theta), -jnp.sin(theta), 0.0],
                              [jnp.sin(theta), jnp.cos(theta), 0.0],
                              [0.0, 0.0, 0.3]])
    stretch = jnp.diag(jnp.array([3.0, 0.5, 1.0]))
    jac = stretch @ rotation @ jnp.linalg.inv(stretch)  # non-normal, |λ| = 0.8
    linear = lambda z, m: z @ m.T
    estimate = jdeq.spectral_radius(linear, jnp.ones((1, 3)), jac,
                                    key=jax.random.PRNGKey(0), iters=400)
    np.testing.assert_allclose(estimate, [0.8], rtol=0.02)

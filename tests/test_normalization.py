"""Weight normalization, spectral normalization and variational dropout masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdeq import nn
from tests import helpers


def _layers():
  rngs = nnx.Rngs(0)
  return [nnx.Linear(6, 5, rngs=rngs), nnx.Conv(3, 4, (3, 3), rngs=rngs)]


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv"])
def test_weight_norm_preserves_direction_and_gain(layer):
  wrapped = nn.WeightNorm(layer)
  v = layer.kernel[...]
  # At initialisation the gain is ‖v‖, so the layer is unchanged.
  np.testing.assert_allclose(wrapped.weight(), v, rtol=1e-6, atol=1e-7)

  gain = jax.random.uniform(jax.random.key(1), wrapped.gain.shape, minval=0.5, maxval=2.0)
  wrapped.gain[...] = gain
  w = wrapped.weight()
  axes = tuple(range(w.ndim - 1))
  # Each output channel keeps the direction of v and has norm exactly g.
  np.testing.assert_allclose(nn.kernel_norm(w), gain, rtol=1e-5)
  np.testing.assert_allclose(w / nn.kernel_norm(w), v / nn.kernel_norm(v),
                             rtol=1e-5, atol=1e-6)
  # Rescaling v does not change w: only its direction matters.
  layer.kernel[...] = 3.0 * v
  np.testing.assert_allclose(wrapped.weight(), w, rtol=1e-5, atol=1e-6)
  assert axes  # at least one reduced axis


def test_weight_norm_layer_output_and_gradients():
  layer = nnx.Conv(3, 4, (3, 3), use_bias=True, rngs=nnx.Rngs(0))
  wrapped = nn.WeightNorm(layer)
  x = jax.random.normal(jax.random.key(2), (2, 5, 5, 3))
  reference = layer(x)
  np.testing.assert_allclose(wrapped(x), reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(wrapped(x, wrapped.weight()), reference, rtol=1e-5, atol=1e-6)

  def loss(module):
    return jnp.sum(module(x) ** 2)
  grads = nnx.grad(loss)(wrapped)
  assert float(jnp.abs(grads.gain[...]).sum()) > 0
  assert float(jnp.abs(grads.layer.kernel[...]).sum()) > 0
  # The gradient of v is orthogonal to v per channel (w depends on v's direction only).
  v = layer.kernel[...]
  radial = jnp.sum(grads.layer.kernel[...] * v, axis=(0, 1, 2))
  np.testing.assert_allclose(radial, 0.0, atol=1e-4)


def test_call_with_kernel_leaves_the_layer_untouched():
  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  before = np.asarray(layer.kernel[...])
  out = nn.call_with_kernel(layer, jnp.ones((1, 3)), jnp.zeros((3, 2)))
  np.testing.assert_allclose(out, layer.bias[...][None])
  np.testing.assert_array_equal(layer.kernel[...], before)


def test_normalizations_reject_layers_without_kernel():
  with pytest.raises(ValueError, match="kernel"):
    nn.WeightNorm(nnx.LayerNorm(3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="kernel"):
    nn.SpectralNorm(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="power_iterations"):
    nn.SpectralNorm(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), power_iterations=0,
                    rngs=nnx.Rngs(0))


def test_spectral_norm_converges_to_unit_spectral_norm():
  layer = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))
  wrapped = nn.SpectralNorm(layer, power_iterations=2, rngs=nnx.Rngs(1))
  vector = np.asarray(wrapped.vector[...])
  wrapped.weight()  # no update outside training
  np.testing.assert_array_equal(wrapped.vector[...], vector)
  for _ in range(30):
    w = wrapped.weight(update=True)
  sigma = np.linalg.svd(np.asarray(w).reshape(-1, 6), compute_uv=False)[0]
  assert abs(sigma - 1.0) < 1e-3
  assert not np.array_equal(wrapped.vector[...], vector)


def test_variational_dropout_mask():
  rate = 0.25
  mask = nn.variational_dropout_mask(jax.random.key(0), 64, 32, rate)
  assert mask.shape == (64, 1, 1, 32)
  values = np.unique(np.asarray(mask))
  np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - rate)], rtol=1e-6)
  assert abs(float(mask.mean()) - 1.0) < 0.05
  assert nn.variational_dropout_mask(jax.random.key(0), 2, 3, 0.5,
                                     spatial_dims=0).shape == (2, 3)
  with pytest.raises(ValueError, match="rate"):
    nn.variational_dropout_mask(jax.random.key(0), 2, 3, 1.0)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_flax_group_norm(x64, affine):
  """jdeq's spatial-first GroupNorm against flax's, values and parameter tree."""
  x = 3 * jax.random.normal(jax.random.key(0), (3, 5, 6, 12), jnp.float64) + 1
  theirs = nnx.GroupNorm(12, num_groups=4, epsilon=1e-5, use_scale=affine,
                         use_bias=affine, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  ours = nn.GroupNorm(12, 4, epsilon=1e-5, affine=affine, param_dtype=jnp.float64)
  if affine:
    for module in (theirs, ours):
      module.scale[...] = jnp.linspace(-1.0, 2.0, 12)
      module.bias[...] = jnp.linspace(0.5, 1.5, 12)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-12)
  assert (jax.tree.structure(nnx.state(ours, nnx.Param))
          == jax.tree.structure(nnx.state(theirs, nnx.Param)))
  with pytest.raises(ValueError, match="groups"):
    nn.GroupNorm(10, 4, epsilon=1e-5)


def test_group_norm_statistics_survive_a_large_mean_in_float32(x64):
  # |μ| = 10³ σ: the unshifted one-pass variance E[x²] − μ² loses every float32
  # digit here (error ~0.2); the shifted one stays as accurate as centring first.
  # Reference: flax's GroupNorm on the same values in float64.
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 16), jnp.float32) + 1e3
  scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-1.0, 1.0, 16)
  reference = nnx.GroupNorm(16, num_groups=4, epsilon=1e-5, param_dtype=jnp.float64,
                            rngs=nnx.Rngs(0))
  reference.scale[...], reference.bias[...] = scale, bias
  expected = reference(x.astype(jnp.float64))
  got = nn.group_norm_nhwc(x, 4, scale.astype(jnp.float32), bias.astype(jnp.float32), 1e-5)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=2e-3)


def test_group_norm_is_as_accurate_in_float32_as_the_two_pass_form_on_a_large_map(x64):
  # A 32×32 map: summing its 1,024 pixels in one sequential (variadic) reduction
  # left a 4e-6 relative error; reducing rows, then columns, keeps it near 1e-7.
  x = jax.nn.relu(jax.random.normal(jax.random.key(5), (4, 32, 32, 24)) + 0.3)
  expected = nn.group_norm_nhwc(x.astype(jnp.float64), 8, None, None, 1e-5)
  got = nn.group_norm_nhwc(x.astype(jnp.float32), 8, None, None, 1e-5)
  assert helpers.relative_error(got.astype(jnp.float64), expected) < 5e-7


def test_group_norm_derivatives_match_finite_differences(x64):
  """JVP and VJP (through the one-pass statistics' own JVP) in float64."""
  keys = jax.random.split(jax.random.key(4), 4)
  x = 2 * jax.random.normal(keys[0], (2, 3, 4, 6), jnp.float64) + 0.5
  scale = jax.random.normal(keys[1], (6,), jnp.float64)
  bias = jax.random.normal(keys[2], (6,), jnp.float64)
  weights = jax.random.normal(keys[3], x.shape, jnp.float64)
  params = (x, scale, bias)
  loss = lambda p: jnp.sum(weights * jnp.tanh(nn.group_norm_nhwc(p[0], 3, p[1], p[2], 1e-5)))
  np.testing.assert_allclose(
      jnp.concatenate([jnp.ravel(g) for g in jax.grad(loss)(params)]),
      jnp.concatenate([jnp.ravel(g) for g in helpers.central_difference_gradient(loss, params)]),
      rtol=1e-6, atol=1e-8)
  direction = helpers.random_like(jax.random.key(5), params)
  _, tangent = jax.jvp(loss, (params,), (direction,))
  np.testing.assert_allclose(tangent, helpers.directional_difference(loss, params, direction),
                             rtol=1e-7)

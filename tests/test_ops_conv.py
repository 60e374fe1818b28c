"""jdeq.ops.conv2d equals lax's convolution in value, VJP and JVP (float64)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdeq import ops
from jdeq.ops import conv2d
from jdeq.ops import conv as conv_module


def _lax(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", [
    ((4, 9, 9, 5), (3, 3, 5, 7), (1, 1), "SAME"),
    ((4, 9, 8, 5), (3, 3, 5, 7), (2, 2), "SAME"),
    ((4, 8, 8, 5), (1, 1, 5, 7), (1, 1), "SAME"),
    ((3, 7, 7, 2), (3, 3, 2, 4), (1, 1), "VALID"),
    ((2, 6, 6, 3), (3, 3, 3, 2), (2, 1), ((1, 0), (2, 1))),
    # strided input adjoints by stride phase: a kernel smaller than the stride,
    # stride 3, uneven kernel and padding
    ((2, 8, 7, 3), (1, 1, 3, 4), (2, 2), "SAME"),
    ((2, 10, 9, 3), (3, 3, 3, 4), (3, 3), "VALID"),
    ((2, 7, 8, 3), (2, 3, 3, 4), (2, 3), ((0, 3), (2, 1))),
    # narrow outputs (input ≥ 4× output channels) run as a matrix product and a
    # shifted sum on XLA:CPU; so do the input adjoints of wide ones
    ((2, 9, 8, 12), (3, 3, 12, 3), (1, 1), "SAME"),
    ((2, 9, 8, 12), (3, 2, 12, 3), (1, 1), "VALID"),
    ((2, 6, 7, 8), (3, 3, 8, 2), (1, 1), ((2, 0), (1, 3))),
    ((2, 8, 8, 3), (3, 3, 3, 12), (1, 1), "SAME"),
    ((2, 9, 8, 2), (3, 3, 2, 8), (2, 2), "SAME"),
])
def test_matches_lax_convolution(x64, x_shape, w_shape, strides, padding):
  kx, kw, kt = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape, jnp.float64)
  w = jax.random.normal(kw, w_shape, jnp.float64)
  ours = lambda x, w: conv2d(x, w, strides, padding)
  theirs = lambda x, w: _lax(x, w, strides, padding)
  np.testing.assert_allclose(ours(x, w), theirs(x, w), atol=1e-12)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(theirs), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-11)
  tangents = (jax.random.normal(kt, x_shape, jnp.float64), 0.5 * w)
  np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1],
                             jax.jvp(theirs, (x, w), tangents)[1], atol=1e-11)


_DERIVATIVE_SHAPES = [
    ((4, 9, 8, 5), (3, 3, 5, 7), (2, 2), "SAME"),
    ((2, 6, 6, 3), (3, 3, 3, 2), (2, 1), ((1, 0), (2, 1))),
    ((2, 7, 8, 3), (2, 3, 3, 4), (2, 3), ((0, 3), (2, 1))),
]


def _assert_derivatives_match_lax(argnum, x_shape, w_shape, strides, padding, seed):
  """conv2d's gradient and JVP in ``x`` (``argnum`` 0) or in ``w`` (1) are lax's."""
  kx, kw, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
  args = [jax.random.normal(kx, x_shape, jnp.float64),
          jax.random.normal(kw, w_shape, jnp.float64)]

  def only(conv):  # the convolution as a function of the argument ``argnum``
    return lambda v: conv(*args[:argnum], v, *args[argnum + 1:], strides, padding)

  loss = lambda conv: lambda v: jnp.sum(jnp.sin(only(conv)(v)))
  primal = args[argnum]
  np.testing.assert_allclose(jax.grad(loss(conv2d))(primal), jax.grad(loss(_lax))(primal),
                             atol=1e-11)
  tangent = jax.random.normal(kt, primal.shape, jnp.float64)
  # conv is linear in each argument: its JVP is the convolution of the tangent
  np.testing.assert_allclose(jax.jvp(only(conv2d), (primal,), (tangent,))[1],
                             only(_lax)(tangent), atol=1e-11)


@pytest.fixture
def cpu_weight_gradient():
  """Sets the CPU weight-gradient form for one test, then restores the suite's."""
  before = ops.cpu_weight_gradient()
  yield ops.set_cpu_weight_gradient
  ops.set_cpu_weight_gradient(before)


@pytest.mark.parametrize("form", ops.CPU_WEIGHT_GRADIENTS)
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", _DERIVATIVE_SHAPES)
def test_every_weight_gradient_form_matches_lax(x64, cpu_weight_gradient, form, x_shape,
                                                w_shape, strides, padding):
  """Each weight-gradient form (chosen by the setting) is lax's derivative."""
  cpu_weight_gradient(form)
  _assert_derivatives_match_lax(1, x_shape, w_shape, strides, padding, seed=1)


@pytest.mark.parametrize("by_phase", [False, True])
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", _DERIVATIVE_SHAPES)
def test_both_strided_input_adjoints_match_lax(x64, monkeypatch, by_phase, x_shape,
                                               w_shape, strides, padding):
  """The strided input adjoint by stride phase (XLA:CPU) and the zero-dilated one
  (accelerators) are both lax's derivative."""
  monkeypatch.setattr(conv_module, "_strided_adjoint_by_phase", lambda: by_phase)
  _assert_derivatives_match_lax(0, x_shape, w_shape, strides, padding, seed=1)


def _convolutions(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def test_narrow_outputs_take_the_matrix_product_on_cpu_only(x64):
  """The shifted-matmul form replaces the convolution of a narrow output on XLA:CPU
  (forward and input adjoint); accelerators keep lax's convolution."""
  x, w = jnp.ones((2, 6, 6, 12)), jnp.ones((3, 3, 12, 3))
  forward = lambda x, w: conv2d(x, w)
  input_adjoint = lambda x, w: jax.grad(lambda w, x: jnp.sum(conv2d(x, w)), 1)(w, x)
  wide = jnp.ones((3, 3, 3, 12))
  x_wide = jnp.ones((2, 6, 6, 3))
  try:
    conv_module.set_derivative_platform("cpu")
    assert _convolutions(forward, x, w) == 0
    assert _convolutions(forward, x_wide, wide) == 1  # a wide output keeps lax's
    assert _convolutions(input_adjoint, x_wide, wide) == 1  # that forward alone
    conv_module.set_derivative_platform("gpu")
    jax.clear_caches()  # the forms are chosen at trace time
    assert _convolutions(forward, x, w) == 1
    assert _convolutions(input_adjoint, x_wide, wide) == 2
  finally:
    conv_module.set_derivative_platform(None)
    jax.clear_caches()


def test_an_unknown_weight_gradient_form_is_named():
  with pytest.raises(ValueError, match="im2col"):
    ops.set_cpu_weight_gradient("fastest")


def test_tune_cpu_runtime_pairs_the_flag_with_the_weight_gradient(monkeypatch,
                                                                  cpu_weight_gradient):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  ops.tune_cpu_runtime()
  assert ops.CPU_CONVOLUTION_FLAG in os.environ["XLA_FLAGS"]
  assert ops.cpu_weight_gradient() == "forward_conv"
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
  ops.tune_cpu_runtime()  # a YNNPACK option of the user's own stays, so do its convs
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-reduce"
  assert ops.cpu_weight_gradient() == "im2col"


def test_linearizing_in_the_input_only_skips_the_patches():
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(lambda x: jax.linearize(lambda v: conv2d(v, w), x)[1](x))(x))
  assert "concatenate" not in jaxpr  # no im2col when the weights are not differentiated


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="channels"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="NHWC"):
    conv2d(jnp.ones((4, 4, 3)), jnp.ones((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="padding"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 4)), padding="FULL")


def test_drop_in_for_flax_conv(x64):
  from flax import nnx
  from jdeq.ops import conv_general_dilated
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3), jnp.float64)
  for strides in (1, 2):
    plain = nnx.Conv(3, 5, (3, 3), strides=strides, rngs=nnx.Rngs(0),
                     param_dtype=jnp.float64)
    fast = nnx.Conv(3, 5, (3, 3), strides=strides, rngs=nnx.Rngs(0),
                    param_dtype=jnp.float64, conv_general_dilated=conv_general_dilated)
    np.testing.assert_allclose(fast(x), plain(x), atol=1e-12)
    grad = lambda m: nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m).kernel[...]
    np.testing.assert_allclose(grad(fast), grad(plain), atol=1e-11)
  # dilation falls through to lax
  dilated = nnx.Conv(3, 5, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0),
                     param_dtype=jnp.float64, conv_general_dilated=conv_general_dilated)
  assert dilated(x).shape == (2, 6, 6, 5)

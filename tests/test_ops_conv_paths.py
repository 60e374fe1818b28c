"""The derivative forms conv2d takes on an accelerator, checked on any backend.

``jdeq.ops.conv2d`` chooses its derivative forms when it is traced, for the platform
it is traced for (``jdeq.ops.conv.derivative_platform``): on a CPU the stride-phase
input adjoint and the CPU weight-gradient setting, elsewhere the zero-dilated input
adjoint and lax's native weight gradient. ``set_derivative_platform("gpu")`` makes
the accelerator choice here, so this suite checks the code a GPU runs on whatever
machine the suite runs on. The oracle is ``jax.lax.conv_general_dilated``
differentiated by JAX itself, in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq import ops
from jdeq.ops import conv as conv_module
from jdeq.ops import conv2d

_SHAPES = [  # (x, w, strides, padding)
    ((3, 9, 9, 4), (3, 3, 4, 5), (1, 1), "SAME"),
    ((3, 9, 8, 4), (3, 3, 4, 5), (2, 2), "SAME"),
    ((2, 8, 8, 3), (1, 1, 3, 4), (1, 1), "VALID"),
    ((2, 8, 7, 3), (1, 1, 3, 4), (2, 2), "SAME"),  # kernel smaller than the stride
    ((2, 10, 9, 3), (3, 3, 3, 4), (3, 3), "VALID"),
    ((2, 7, 8, 3), (2, 3, 3, 4), (2, 3), ((0, 3), (2, 1))),
]


def _lax(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def on_platform():
  """Sets the platform conv2d chooses its derivatives for; restores the default."""
  before_form = ops.cpu_weight_gradient()
  yield conv_module.set_derivative_platform
  conv_module.set_derivative_platform(None)
  ops.set_cpu_weight_gradient(before_form)


def _random(seed, *shapes):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes)]


def test_the_default_platform_is_the_backend(on_platform):
  assert conv_module.derivative_platform() == jax.default_backend()
  on_platform("gpu")
  assert conv_module.derivative_platform() == "gpu"
  on_platform(None)
  assert conv_module.derivative_platform() == jax.default_backend()


def test_an_unknown_platform_is_named():
  with pytest.raises(ValueError, match="platform"):
    conv_module.set_derivative_platform("cuda0")


@pytest.mark.parametrize("cpu_form", ops.CPU_WEIGHT_GRADIENTS)
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", _SHAPES)
def test_accelerator_forms_match_lax(x64, on_platform, cpu_form, x_shape, w_shape,
                                     strides, padding):
  """Value, gradient in both arguments, JVP and a Hessian-vector product.

  The CPU weight-gradient setting must not matter once the platform is an
  accelerator's: every setting gives lax's derivatives.
  """
  ops.set_cpu_weight_gradient(cpu_form)
  on_platform("gpu")
  x, w, tx, tw = _random(3, x_shape, w_shape, x_shape, w_shape)
  ours = lambda x, w: conv2d(x, w, strides, padding)
  theirs = lambda x, w: _lax(x, w, strides, padding)
  np.testing.assert_allclose(ours(x, w), theirs(x, w), atol=1e-12)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(theirs), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-11)
  np.testing.assert_allclose(jax.jvp(ours, (x, w), (tx, tw))[1],
                             jax.jvp(theirs, (x, w), (tx, tw))[1], atol=1e-11)
  # forward over reverse: differentiates the derivative forms themselves
  hvp = lambda conv: jax.jvp(jax.grad(loss(conv), (0, 1)), (x, w), (tx, tw))[1]
  for a, b in zip(hvp(ours), hvp(theirs)):
    np.testing.assert_allclose(a, b, atol=1e-10)


def _convolutions(jaxpr) -> list[dict]:
  """The parameters of each convolution in a jaxpr's top level, in order."""
  return [dict(e.params) for e in jaxpr.jaxpr.eqns
          if e.primitive.name == "conv_general_dilated"]


def _input_gradient_jaxpr(x_shape, w_shape, strides):
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  return jax.make_jaxpr(jax.grad(lambda x: jnp.sum(conv2d(x, w, strides))))(x)


def test_the_platform_selects_the_strided_input_adjoint(on_platform):
  """A GPU gets one zero-dilated convolution, a CPU one per stride phase."""
  shapes = ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2))
  on_platform("gpu")
  accelerator = _convolutions(_input_gradient_jaxpr(*shapes))
  on_platform("cpu")
  cpu = _convolutions(_input_gradient_jaxpr(*shapes))
  # the forward convolution, then the adjoint(s)
  assert len(accelerator) == 2 and accelerator[1]["lhs_dilation"] == (2, 2)
  assert len(cpu) == 1 + 4 and all(c["lhs_dilation"] == (1, 1) for c in cpu)


@pytest.mark.parametrize("cpu_form", ["im2col", "forward_conv"])
def test_the_platform_selects_the_native_weight_gradient(on_platform, cpu_form):
  """On an accelerator the weight gradient is lax's own, whatever the CPU setting."""
  ops.set_cpu_weight_gradient(cpu_form)
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

  def program():
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv2d(x, w))))(w)
    return str(jaxpr), _convolutions(jaxpr)

  native = _convolutions(jax.make_jaxpr(
      jax.grad(lambda w: jnp.sum(_lax(x, w, (1, 1), "SAME"))))(w))
  on_platform("gpu")
  text, convolutions = program()
  assert "optimization_barrier" not in text and "concatenate" not in text
  assert convolutions == native  # JAX's own backprop-filter convolution
  on_platform("cpu")
  text, _ = program()
  marker = "concatenate" if cpu_form == "im2col" else "optimization_barrier"
  assert marker in text  # the CPU form, so the switch is what made the difference


def test_conv_deq_gradient_with_accelerator_forms(x64, on_platform):
  """IFT through a strided conv cell (linearized in the state, transposed) with the
  accelerator forms equals the same cell written with lax."""
  on_platform("gpu")
  x, w1, w2 = _random(5, (2, 8, 8, 3), (3, 3, 4, 4), (3, 3, 3, 4))
  w1 = 0.15 * w1
  solver = jdeq.Anderson(max_iter=200, tol=1e-13, stop_mode="abs")
  grad = jdeq.IFT(jdeq.Anderson(max_iter=200, tol=1e-13, stop_mode="abs"))

  def loss(conv):
    def cell(z, w1, w2, x):  # the stride-2 injection keeps the strided adjoint in play
      return jnp.tanh(conv(z, w1, (1, 1), "SAME") + conv(x, w2, (2, 2), "SAME"))

    def value(w1, w2, x):
      z0 = jnp.zeros((x.shape[0], 4, 4, 4), x.dtype)
      z, _ = jdeq.fixed_point(cell, z0, w1, w2, x, solver=solver, grad=grad)
      return jnp.sum(jnp.sin(z))
    return value

  ours = jax.grad(loss(conv2d), (0, 1, 2))(w1, w2, x)
  theirs = jax.grad(loss(_lax), (0, 1, 2))(w1, w2, x)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-9)

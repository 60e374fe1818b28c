"""The state's dtype goes through every solver and gradient mode unchanged.

float32 and float64 in, the same dtype out, for ``z*``, the statistics and the
gradients; half-precision states are refused with an error naming the dtype.
Dtypes are fixed when a program is traced, so ``jax.eval_shape`` checks them
exactly without compiling thirty while loops (the values are checked elsewhere).
"""

import jax
import jax.numpy as jnp
import pytest

import jdeq

SOLVERS = (jdeq.FixedPointIteration(20, 1e-4), jdeq.Anderson(20, 1e-4, m=3),
           jdeq.Broyden(20, 1e-4, memory=5))


def _modes(solver):
  return (jdeq.IFT(solver), jdeq.Phantom(k=2), jdeq.JFB())


def _cell(z, w, x):
  return jnp.tanh(z @ w + x)


def _every_combination(w, x):
  """z*, stats and d(loss)/d(w, x) for each solver × mode (and Unrolled), one program."""
  results = {}

  def loss(w, x, solver, grad):
    z, stats = jdeq.fixed_point(_cell, jnp.zeros_like(x), w, x, solver=solver,
                                grad=grad)
    return jnp.sum(jnp.sin(z)), (z, stats)

  for solver in SOLVERS:
    for grad in _modes(solver):
      results[type(solver).__name__, type(grad).__name__] = jax.grad(
          loss, argnums=(0, 1), has_aux=True)(w, x, solver, grad)
  results["-", "Unrolled"] = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      w, x, SOLVERS[0], jdeq.Unrolled(3))
  return results


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_solver_and_gradient_mode_keeps_the_dtype(dtype):
  with jax.enable_x64(dtype == "float64"):
    w = 0.4 * jnp.eye(3, dtype=dtype) + 0.1
    x = jnp.asarray([[0.3, -0.2, 0.5], [1.0, 0.1, -0.7]], dtype)
    results = jax.eval_shape(_every_combination, w, x)
    assert len(results) == 3 * 3 + 1
    for name, ((grad_w, grad_x), (z, stats)) in results.items():
      assert z.dtype == dtype and z.shape == x.shape, name
      assert grad_w.dtype == dtype and grad_x.dtype == dtype, name
      assert grad_w.shape == w.shape and grad_x.shape == x.shape, name
      assert stats.abs_residual.dtype == stats.rel_residual.dtype == dtype, name
      assert stats.nstep.dtype == jnp.int32 and stats.converged.dtype == bool, name


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_state_is_refused_by_name(dtype):
  x = jnp.ones((2, 3), dtype)
  with pytest.raises(ValueError, match=rf"z0 has dtype {jnp.dtype(dtype).name}; the "
                                       r"solvers run in float32 or float64 only"):
    jdeq.fixed_point(_cell, jnp.zeros_like(x), jnp.eye(3, dtype=dtype), x)

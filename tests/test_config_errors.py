"""Bad input gets a clear error naming the problem."""

import dataclasses

import jax.numpy as jnp
import pytest

import jdeq

f = lambda z, x: jnp.tanh(z + x)


@pytest.mark.parametrize("make", [
    lambda: jdeq.Anderson(max_iter=10, window=3),
    lambda: jdeq.FixedPointIteration(dampin=0.5),
    lambda: jdeq.Broyden(mem=3),
    lambda: jdeq.IFT(tol=1e-3),
    lambda: jdeq.Phantom(steps=3),
    lambda: jdeq.Krylov(method="gmres", maxiter=3),
])
def test_unknown_option_is_named(make):
  with pytest.raises(ValueError, match="unknown option"):
    make()


@pytest.mark.parametrize("make, name", [
    (lambda: jdeq.Anderson(tol=0.0), "tol"),
    (lambda: jdeq.Anderson(tol=-1e-3), "tol"),
    (lambda: jdeq.Broyden(max_iter=0), "max_iter"),
    (lambda: jdeq.FixedPointIteration(damping=1.5), "damping"),
    (lambda: jdeq.Anderson(m=0), "m"),
    (lambda: jdeq.Anderson(ridge=0.0), "ridge"),
    (lambda: jdeq.Anderson(stop_mode="relative"), "stop_mode"),
    (lambda: jdeq.Broyden(stop_scope="group"), "stop_scope"),
    (lambda: jdeq.Phantom(k=0), "k"),
    (lambda: jdeq.Unrolled(steps=0), "steps"),
    (lambda: jdeq.Unrolled(unroll=0), "unroll"),
    (lambda: jdeq.Phantom(unroll="all"), "unroll"),
    (lambda: jdeq.Krylov(method="bicgstab"), "method"),
    (lambda: jdeq.Krylov(tol=0.0), "tol"),
    (lambda: jdeq.IFT(solver="anderson"), "solver"),
])
def test_invalid_values_are_named(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_configs_are_hashable_and_frozen():
  solver = jdeq.Anderson(max_iter=10)
  assert hash(solver) == hash(jdeq.Anderson(max_iter=10))
  assert {jdeq.IFT(solver): 1}[jdeq.IFT(jdeq.Anderson(max_iter=10))] == 1
  with pytest.raises(dataclasses.FrozenInstanceError, match="'m'"):
    solver.m = 3


def test_mismatched_structure_is_named():
  z0 = [jnp.zeros((2, 3)), jnp.zeros((2, 4))]
  with pytest.raises(ValueError, match="structure"):
    jdeq.fixed_point(lambda z, x: z[0], z0, 1.0)


def test_mismatched_shape_is_named():
  with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
    jdeq.fixed_point(lambda z, x: jnp.zeros((2, 4)), jnp.zeros((2, 3)), 1.0)


def test_mismatched_dtype_is_named():
  with pytest.raises(ValueError, match="dtype"):
    jdeq.fixed_point(lambda z, x: z.astype(jnp.bfloat16), jnp.zeros((2, 3)), 1.0)


def test_state_without_batch_axis_or_with_ragged_batch():
  with pytest.raises(ValueError, match="batch"):
    jdeq.fixed_point(f, jnp.float32(0.0), 1.0)
  with pytest.raises(ValueError, match="batch size"):
    jdeq.fixed_point(lambda z, x: z, [jnp.zeros((2, 3)), jnp.zeros((3, 3))], 1.0)


def test_integer_state_is_rejected():
  with pytest.raises(ValueError, match="floating"):
    jdeq.fixed_point(lambda z, x: z, jnp.zeros((2, 3), jnp.int32), 1)


def test_wrong_config_kinds_are_named():
  with pytest.raises(ValueError, match="solver"):
    jdeq.fixed_point(f, jnp.zeros((2, 3)), 1.0, solver=jdeq.IFT())
  with pytest.raises(ValueError, match="grad"):
    jdeq.fixed_point(f, jnp.zeros((2, 3)), 1.0, grad=jdeq.Anderson())


def test_regularizer_arguments_are_checked():
  import jax
  with pytest.raises(ValueError, match="num_probes"):
    jdeq.jacobian_fro_sq(f, jnp.zeros((2, 3)), 1.0, key=jax.random.PRNGKey(0),
                         num_probes=0)
  with pytest.raises(ValueError, match="iters"):
    jdeq.spectral_radius(f, jnp.zeros((2, 3)), 1.0, key=jax.random.PRNGKey(0),
                         iters=1)

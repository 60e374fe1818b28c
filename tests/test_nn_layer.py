"""The NNX equilibrium layer: solving, modes, budgets, and shared per-pass arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import nn
from jdeq.models import cells
from tests import helpers

WIDTH, HIDDEN, BATCH = 6, 8, 3


def _layer(dropout=0.0, **kwargs):
  cell = cells.MLPCell(WIDTH, HIDDEN, dropout=dropout, rngs=nnx.Rngs(0))
  options = dict(solver=jdeq.Anderson(max_iter=60, tol=1e-6),
                 grad=jdeq.IFT(jdeq.Anderson(max_iter=60, tol=1e-10, stop_mode="abs")))
  options.update(kwargs)
  return nn.DEQ(cell, **options)


def _injection(dtype=jnp.float32):
  return jax.random.normal(jax.random.key(3), (BATCH, WIDTH), dtype)


def test_solves_the_cell_equilibrium():
  layer = _layer()
  x = _injection()
  z_star, aux = layer(x, train=False)
  prepared = layer.cell.prepare(x, train=False, key=None)
  np.testing.assert_allclose(layer.cell(z_star, x, prepared), z_star, atol=1e-4)
  assert aux.stats.rel_residual.shape == (BATCH,)
  assert bool(jnp.all(aux.stats.converged))
  np.testing.assert_array_equal(aux.jac_loss, np.zeros(BATCH))


def test_train_and_eval_budgets_are_separate_and_budget_is_honoured():
  layer = _layer(solver=jdeq.Anderson(max_iter=3, tol=1e-12),
                 eval_solver=jdeq.Anderson(max_iter=7, tol=1e-12))
  x = _injection()
  _, train_aux = layer(x, train=True)
  _, eval_aux = layer(x, train=False)
  np.testing.assert_array_equal(train_aux.stats.nstep, 3)
  np.testing.assert_array_equal(eval_aux.stats.nstep, 7)
  _, budget_aux = layer(x, train=False, budget=jnp.asarray(5))
  np.testing.assert_array_equal(budget_aux.stats.nstep, 5)


def test_unrolled_mode_backpropagates_through_plain_iterations():
  layer = _layer(unrolled_steps=4)
  x = _injection()
  z, aux = layer(x, train=False, unrolled=True)
  np.testing.assert_array_equal(aux.stats.nstep, 4)
  prepared = layer.cell.prepare(x, train=False, key=None)
  expected = jnp.zeros_like(x)
  for _ in range(4):
    expected = layer.cell(expected, x, prepared)
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)


def test_jacobian_penalty_is_requested_per_call():
  layer = _layer()
  x = _injection()
  _, aux = layer(x, train=False, jac_probes=2, jacobian_key=jax.random.key(0))
  assert aux.jac_loss.shape == (BATCH,)
  assert bool(jnp.all(aux.jac_loss > 0))
  with pytest.raises(ValueError, match="jacobian_key"):
    layer(x, train=False, jac_probes=1)


def test_bad_configuration_is_named():
  with pytest.raises(ValueError, match="EquilibriumCell"):
    nn.DEQ(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="unrolled"):
    _layer(grad=jdeq.Unrolled(3))
  with pytest.raises(ValueError, match="solver"):
    _layer(solver=jdeq.IFT())
  with pytest.raises(ValueError, match="dropout key"):
    _layer(dropout=0.5)(_injection(), train=True)


def test_prepared_arrays_are_computed_once_per_forward_and_backward(monkeypatch):
  """Weights and masks are computed once outside the solver; f only receives them.

  If they were computed inside ``f`` they would be traced again for the solver's
  first evaluation, its loop body, the shape check and the backward linearization.
  """
  calls = {"weight": 0, "mask": 0}
  original_weight, original_mask = nn.WeightNorm.weight, nn.variational_dropout_mask

  def counting_weight(self):
    calls["weight"] += 1
    return original_weight(self)

  def counting_mask(*args, **kwargs):
    calls["mask"] += 1
    return original_mask(*args, **kwargs)

  monkeypatch.setattr(nn.WeightNorm, "weight", counting_weight)
  monkeypatch.setattr(cells.nn, "variational_dropout_mask", counting_mask)
  layer = _layer(dropout=0.5)
  x = _injection()

  def loss(layer):
    z, _ = layer(x, train=True, dropout_key=jax.random.key(0))
    return jnp.sum(z ** 2)

  grads = nnx.jit(nnx.grad(loss))(layer)
  assert calls == {"weight": 2, "mask": 1}  # two weight-normed layers, one mask
  assert float(jnp.abs(grads.cell.layer1.gain[...]).sum()) > 0


def test_same_mask_in_every_iteration_and_in_the_backward_pass(x64):
  """Train-mode equilibrium and IFT gradient are those of ONE fixed-mask map.

  With a mask redrawn per iteration there would be no fixed point to converge to,
  and a mask redrawn in the backward pass would give a gradient that disagrees with
  finite differences of the forward pass.
  """
  layer = _layer(dropout=0.5, solver=jdeq.Anderson(max_iter=100, tol=1e-12))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), nnx.state(layer, nnx.Param))
  nnx.update(layer, params)
  x = _injection(jnp.float64)
  key = jax.random.key(7)
  graphdef, params = nnx.split(layer, nnx.Param)

  def forward(params):
    z, aux = nnx.merge(graphdef, params)(x, train=True, dropout_key=key)
    return z, aux

  z_star, aux = forward(params)
  assert bool(jnp.all(aux.stats.converged))
  cell = nnx.merge(graphdef, params).cell
  prepared = cell.prepare(x, train=True, key=key)
  assert float(jnp.mean(prepared["mask"] == 0)) > 0.1  # the mask really drops units
  np.testing.assert_allclose(cell(z_star, x, prepared), z_star, atol=1e-8)

  weights = jax.random.normal(jax.random.key(1), z_star.shape, jnp.float64)
  loss = lambda p: jnp.sum(weights * forward(p)[0])
  grad = jax.grad(loss)(params)
  direction = helpers.random_like(jax.random.key(2), params)
  numeric = helpers.directional_difference(loss, params, direction, eps=1e-5)
  analytic = helpers.tree_vdot(grad, direction)
  assert abs(float(analytic - numeric)) / abs(float(numeric)) < 1e-5


@pytest.mark.parametrize("grad", [jdeq.Phantom(k=3, damping=0.5), jdeq.JFB()])
def test_evaluation_returns_the_solver_output_without_gradient_steps(grad):
  # An unconverged solve, so that extra map evaluations would change the output.
  solver = jdeq.Anderson(max_iter=2, tol=1e-12)
  layer = _layer(solver=solver, eval_solver=solver, grad=grad)
  reference = _layer(solver=solver, eval_solver=solver)  # IFT: output = z*
  x = _injection()
  z_eval, _ = layer(x, train=False)
  np.testing.assert_array_equal(z_eval, reference(x, train=False)[0])
  z_train, _ = layer(x, train=True)
  assert float(jnp.max(jnp.abs(z_train - z_eval))) > 1e-4
  # Differentiated anyway, the evaluation output has the implicit gradient.
  grad_eval = jax.grad(lambda x: jnp.sum(layer(x, train=False)[0]))(x)
  grad_ift = jax.grad(lambda x: jnp.sum(reference(x, train=False)[0]))(x)
  np.testing.assert_allclose(grad_eval, grad_ift, rtol=1e-5, atol=1e-6)


def test_train_output_f_of_z_star_is_one_more_cell_application_with_the_same_masks(x64):
  x = _injection(jnp.float64)
  key = jax.random.key(7)
  plain = _layer(dropout=0.2, solver=jdeq.Anderson(max_iter=3, tol=1e-12))
  stepped = _layer(dropout=0.2, solver=jdeq.Anderson(max_iter=3, tol=1e-12),
                   train_output="f_z_star")
  z_star, aux = plain(x, train=True, dropout_key=key)
  prepared = plain.cell.prepare(x, train=True, key=key)  # the solve's very masks
  expected = plain.cell(z_star, x, prepared)
  assert float(jnp.max(jnp.abs(expected - z_star))) > 1e-6  # 3 steps: not converged
  out, stepped_aux = stepped(x, train=True, dropout_key=key)
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(stepped_aux.stats.rel_residual, aux.stats.rel_residual)
  # Evaluation and the unrolled mode return their own state.
  np.testing.assert_array_equal(stepped(x, train=False)[0], plain(x, train=False)[0])
  np.testing.assert_array_equal(stepped(x, train=True, unrolled=True, dropout_key=key)[0],
                                plain(x, train=True, unrolled=True, dropout_key=key)[0])


def test_train_output_f_of_z_star_has_the_implicit_gradient(x64):
  # With an exact solve, d f(z*)/dθ = d z*/dθ: both carry (I − J)⁻¹ ∂f/∂θ. (The
  # first sample of this cell has no equilibrium within reach; the others converge.)
  x = _injection(jnp.float64)[1:]
  exact = dict(solver=jdeq.Anderson(max_iter=200, tol=1e-13, stop_mode="abs"),
               grad=jdeq.IFT(jdeq.Anderson(max_iter=200, tol=1e-13, stop_mode="abs")))
  grads = []
  for output in ("z_star", "f_z_star"):
    layer = _layer(train_output=output, **exact)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def loss(params):
      z, _ = nnx.merge(graphdef, params, rest, copy=True)(x, train=True)
      return jnp.sum(jnp.sin(z))

    grads.append(jax.grad(loss)(params))
  assert helpers.relative_error(grads[1], grads[0]) < 1e-7


def test_train_output_f_of_z_star_solves_backward_for_its_own_cotangent(x64):
  """The reference's backward on f(z*): u = u J + ∂ℓ/∂f(z*), then u ∂f/∂θ.

  With a loss linear in the output, both outputs have the same cotangent, so with
  IFT their gradients agree to round-off even though neither solve converges:
  differentiating through the extra application would instead solve for
  ``∂ℓ/∂out · J`` and part wherever the truncated backward solve is inexact.
  """
  x = _injection(jnp.float64)[1:]
  loose = dict(solver=jdeq.Anderson(max_iter=4, tol=1e-13),
               grad=jdeq.IFT(jdeq.FixedPointIteration(max_iter=3, tol=1e-13)))
  weights = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
  grads = {}
  for output in ("z_star", "f_z_star"):
    layer = _layer(train_output=output, **loose)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def loss(params, graphdef=graphdef, rest=rest):
      z, _ = nnx.merge(graphdef, params, rest, copy=True)(x, train=True)
      return jnp.sum(weights * z)

    grads[output] = jax.grad(loss)(params)
  assert helpers.relative_error(grads["f_z_star"], grads["z_star"]) < 1e-12
  # Differentiated through the extra application, the gradient would differ.
  layer = _layer(**loose)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  f, _ = layer.pure_map()

  def through(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    z, _ = model(x, train=True)
    prepared = model.cell.prepare(x, train=True, key=None)
    return jnp.sum(weights * f(z, nnx.state(model.cell, nnx.Param), prepared, x))

  assert helpers.relative_error(jax.grad(through)(params), grads["z_star"]) > 1e-4


def test_train_output_must_be_a_known_choice():
  with pytest.raises(ValueError, match="train_output"):
    _layer(train_output="f")

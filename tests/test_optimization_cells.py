"""Optimization-induced cells (OptEq, MOptEqs, GEQ): the objective behind each cell.

The properties promised in docs/optimization_cells.md: the closed-form update is a
proximal-gradient step on the documented objective, equilibria are its minimizers,
the objective decreases along damped iterations, the Gaussian kernel tends to the
linear one as γ → 0, γ follows 0.2 / M, and the models are differentiable.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import models, nn
from jdeq.models import optimization as opt
from jdeq.models.optimization import operators as ops_lib
from tests.helpers import directional_difference, random_like, tree_vdot

TIGHT = jdeq.Anderson(max_iter=200, tol=1e-13, m=6, stop_mode="abs")


def to_float64(module):
  """The module with every floating state leaf cast to float64."""
  graphdef, state = nnx.split(module)
  state = jax.tree.map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      state)
  return nnx.merge(graphdef, state)


def saturate_norms(module, logit: float = 6.0):
  """Pushes every spectral gain towards its bound (sigmoid(6) ≈ 0.9975): the hardest,
  least contractive case the parameterization allows."""
  for _, value in nnx.iter_graph(module):
    if isinstance(value, (ops_lib.SpectralConv, ops_lib.SpectralChannelMap)):
      value.gain[...] = jnp.full_like(value.gain[...], logit)
  return module


def make_cell(kind: str, *, saturate: bool = True):
  rngs = nnx.Rngs(0)
  if kind == "opteq":
    cell = opt.OptEqCell(3, 4, rngs=rngs)
  elif kind == "mopteqs":
    cell = opt.MOptEqsCell(3, (4, 5, 3), coupling=0.01, rngs=rngs)
  elif kind == "mopteqs_strong_coupling":
    cell = opt.MOptEqsCell(3, (4, 4), coupling=0.5, rngs=rngs)
  elif kind == "geq":
    cell = opt.GEQCell(3, (4, 5, 3), rngs=rngs)
  elif kind == "geq_coupled":
    cell = opt.GEQCell(3, (4, 4), coupling=0.01, rngs=rngs)
  else:
    raise ValueError(kind)
  cell = to_float64(cell)
  return saturate_norms(cell) if saturate else cell


def operators_of(cell, x):
  """``cell.operators(x)``, compiled (eager dispatch of the many small ops is slow)."""
  graphdef, state = nnx.split(cell)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state).operators(x))(state, x)


def compiled(spec):
  """The objective's functions, compiled."""
  return (jax.jit(spec.value), jax.jit(spec.smooth_value),
          jax.jit(spec.smooth_gradient), jax.jit(spec.update))


def random_input(key, batch=3, size=8, channels=3):
  return jax.nn.relu(jax.random.normal(key, (batch, size, size, channels), jnp.float64))


def random_state(key, cell, x, scale=1.0):
  template = cell.initial_state(x)
  noise = random_like(key, template)
  return jax.tree.map(lambda n: scale * jax.nn.relu(n), noise)


CELLS = ("opteq", "mopteqs", "mopteqs_strong_coupling", "geq")


# --- operators ----------------------------------------------------------------------


def dense_matrix(linear_map, example):
  flat = example.ravel()
  return np.asarray(jax.jit(jax.jacfwd(
      lambda v: linear_map(v.reshape(example.shape)).ravel()))(flat))


@pytest.mark.parametrize("grid", [(6, 4), (2, 2)])
def test_circular_conv_norm_is_exact_and_transpose_is_adjoint(x64, grid):
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5), jnp.float64)
  example = jnp.zeros((1,) + grid + (4,), jnp.float64)
  dense = dense_matrix(lambda v: ops_lib.circular_conv(v, kernel), example)
  exact = np.linalg.norm(dense, 2)
  np.testing.assert_allclose(ops_lib.circular_conv_norm_exact(kernel, grid), exact,
                             rtol=1e-10)
  bound = float(ops_lib.circular_conv_norm(kernel, grid))  # certified, ≤ 2.7% above
  assert exact * (1 - 1e-12) <= bound <= exact * 4 ** (1 / 128)
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + grid + (4,), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (2,) + grid + (5,), jnp.float64)
  np.testing.assert_allclose(
      jnp.vdot(ops_lib.circular_conv(x, kernel), y),
      jnp.vdot(x, ops_lib.circular_conv_transpose(y, kernel)), rtol=1e-10)


@pytest.mark.parametrize("grid, channels", [((6, 4), (4, 5)), ((2, 2), (3, 3)),
                                           ((5, 7), (5, 2))])
def test_spectral_application_is_the_circular_conv(x64, grid, channels):
  """The cells apply W, Wᵀ and WᵀW through the real FFT (one matrix per frequency);
  that is the same linear map as the spatial circular convolution, on even and odd
  grids and grids smaller than the kernel."""
  c_in, c_out = channels
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, c_in, c_out), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + grid + (c_in,), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (2,) + grid + (c_out,), jnp.float64)
  symbol = ops_lib.circular_conv_symbol(kernel, grid, half=True)
  assert symbol.shape == (grid[0], grid[1] // 2 + 1, c_in, c_out)
  np.testing.assert_allclose(ops_lib.spectral_conv(x, symbol),
                             ops_lib.circular_conv(x, kernel), atol=1e-12)
  np.testing.assert_allclose(ops_lib.spectral_conv(y, symbol, adjoint=True),
                             ops_lib.circular_conv_transpose(y, kernel), atol=1e-12)
  np.testing.assert_allclose(
      ops_lib.spectral_conv(x, ops_lib.spectral_gram(symbol)),
      ops_lib.circular_conv_transpose(ops_lib.circular_conv(x, kernel), kernel),
      atol=1e-12)
  # the half-grid symbol is the full one restricted to the real-FFT frequencies
  full = ops_lib.circular_conv_symbol(kernel, grid)
  np.testing.assert_allclose(symbol, full[:, :grid[1] // 2 + 1], atol=1e-12)


def test_norm_bound_gradient_matches_finite_differences(x64):
  """The bound is differentiated through its maximizing frequency only: that is the
  exact gradient of the maximum over the grid."""
  kernel = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 4, 5), jnp.float64)
  direction = jax.random.normal(jax.random.PRNGKey(4), kernel.shape, jnp.float64)
  for grid in ((8, 8), (6, 4), (2, 2)):
    bound = jax.jit(lambda k: ops_lib.circular_conv_norm(k, grid))
    gradient = jax.jit(jax.grad(lambda k: ops_lib.circular_conv_norm(k, grid)))(kernel)
    expected = directional_difference(bound, kernel, direction, eps=1e-6)
    np.testing.assert_allclose(jnp.vdot(gradient, direction), expected, rtol=1e-7)


def test_spectral_parameterization_bounds_every_operator(x64):
  cell = make_cell("mopteqs", saturate=True)
  x = random_input(jax.random.PRNGKey(0))
  operators = operators_of(cell, x)
  for level, branch in enumerate(operators["branches"]):
    # the exact norm (checked against dense matrices above): saturated, still < 0.9
    norm = ops_lib.circular_conv_norm_exact(branch["w"], (8 >> level, 8 >> level))
    assert 0.9 * 0.99 / 4 ** (1 / 128) < float(norm) < 0.9
  for matrix in operators["down"]:
    assert np.linalg.norm(np.asarray(matrix), 2) < 1.0


def test_down_sampling_adjoint(x64):
  from jdeq.models.optimization.branches import down, down_transpose
  matrix = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4), jnp.float64)
  r = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3), jnp.float64)
  np.testing.assert_allclose(jnp.vdot(down(z, matrix), r),
                             jnp.vdot(z, down_transpose(r, matrix)), rtol=1e-10)


# --- the update is a proximal-gradient step on the objective -------------------------


@pytest.mark.parametrize("kind", CELLS + ("geq_coupled",))
def test_closed_form_gradient_matches_autodiff_of_objective(x64, kind):
  # The values use the spatial circular convolutions, the closed-form gradients
  # (the cell map) their real-FFT symbols: this also checks the two agree.
  cell = make_cell(kind)
  x = random_input(jax.random.PRNGKey(1))
  z = random_state(jax.random.PRNGKey(2), cell, x)
  operators = operators_of(cell, x)
  _, smooth_value, smooth_gradient, update = compiled(cell.objective_spec)
  closed_form = smooth_gradient(z, operators)
  autodiff = jax.jit(jax.grad(lambda z, ops: jnp.sum(smooth_value(z, ops))))(z, operators)
  for a, b in zip(jax.tree.leaves(closed_form), jax.tree.leaves(autodiff)):
    np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-10)
  # T(z) = ReLU(z − ∇G_s(z)), and the objective is per sample.
  step = update(z, operators)
  for zi, gi, ti in zip(z, closed_form, step):
    np.testing.assert_allclose(ti, jax.nn.relu(zi - gi), atol=1e-13)
  values = smooth_value(z, operators)
  first = smooth_value(jax.tree.map(lambda a: a[:1], z), operators_of(cell, x[:1]))
  np.testing.assert_allclose(values[:1], first, rtol=1e-12)


@pytest.mark.parametrize("kind", CELLS)
def test_equilibrium_is_stationary_point_of_the_objective(x64, kind):
  cell = make_cell(kind)
  x = random_input(jax.random.PRNGKey(3))
  operators = operators_of(cell, x)
  spec = cell.objective_spec
  solve = jax.jit(lambda z0, ops: jdeq.fixed_point(spec.update, z0, ops, solver=TIGHT))
  z_star, stats = solve(cell.initial_state(x), operators)
  scale = jdeq.per_sample_norm(z_star)
  assert bool(jnp.all(stats.converged))
  assert bool(jnp.all(jax.jit(spec.prox_residual)(z_star, operators) / scale < 1e-4))
  assert bool(jnp.all(jax.jit(spec.stationarity)(z_star, operators) / scale < 1e-4))
  # A convex G: no feasible point near z* is lower (up to rounding).
  value = jax.jit(spec.value)
  for seed in range(3):
    nearby = jax.tree.map(
        lambda z, n: jax.nn.relu(z + 0.05 * n), z_star,
        random_like(jax.random.PRNGKey(10 + seed), z_star))
    assert bool(jnp.all(value(nearby, operators)
                        >= value(z_star, operators) - 1e-10 * scale ** 2))


@pytest.mark.parametrize("kind", CELLS)
def test_objective_non_increasing_along_damped_iterations(x64, kind):
  cell = make_cell(kind)
  x = random_input(jax.random.PRNGKey(4), size=8)
  z = random_state(jax.random.PRNGKey(5), cell, x, scale=2.0)
  operators = operators_of(cell, x)
  spec = cell.objective_spec

  @jax.jit
  def trajectory(z, operators, damping):
    def damped_step(z, _):
      step = spec.update(z, operators)
      z = jax.tree.map(lambda a, b: (1 - damping) * a + damping * b, z, step)
      return z, spec.value(z, operators)
    _, values = jax.lax.scan(damped_step, z, length=25)
    return jnp.concatenate([spec.value(z, operators)[None], values])

  for damping in (0.3, 1.0):
    values = trajectory(z, operators, damping)  # (steps + 1, B)
    assert bool(jnp.all(jnp.isfinite(values)))
    increase = jnp.diff(values, axis=0)
    assert bool(jnp.all(increase <= 1e-10 * jnp.abs(values[:-1]) + 1e-12)), increase
    assert bool(jnp.all(values[-1] < values[0]))


# --- GEQ: the Gaussian kernel ----------------------------------------------------------


def test_gaussian_kernel_tends_to_linear_kernel_as_gamma_vanishes(x64):
  """γ → 0: G_γ(z) → G_lin(z) = ½‖z‖² − ½‖Wz‖² − ⟨b, z⟩ + ½‖x − W_h z‖² and
  T_γ(z) → ReLU((WᵀW − W_hᵀW_h) z + W_hᵀ x + b), with errors O(γ)."""
  x = random_input(jax.random.PRNGKey(6))
  errors_value, errors_step = [], []
  for gamma in (1e-2, 1e-3, 1e-4):
    cell = saturate_norms(to_float64(opt.GEQCell(3, (4,), gamma=gamma,
                                                 rngs=nnx.Rngs(0))))
    cell.bias[0][...] = 0.1 * jnp.arange(4.0)
    z = random_state(jax.random.PRNGKey(7), cell, x)
    branch = cell.operators(x)["branches"][0]
    w, w_h, b = branch["w"], branch["w_h"], branch["bias"]
    (zi,) = z
    wz = ops_lib.circular_conv(zi, w)
    reconstruction = x - ops_lib.circular_conv(zi, w_h)
    linear_value = (0.5 * jnp.sum(zi ** 2, (1, 2, 3)) - 0.5 * jnp.sum(wz ** 2, (1, 2, 3))
                    - jnp.sum(b * zi, (1, 2, 3))
                    + 0.5 * jnp.sum(reconstruction ** 2, (1, 2, 3)))
    injection = ops_lib.circular_conv_transpose(x, w_h) + b  # U x + b with U = W_hᵀ
    mixing = (ops_lib.circular_conv_transpose(wz, w)
              - ops_lib.circular_conv_transpose(ops_lib.circular_conv(zi, w_h), w_h))
    linear_step = jax.nn.relu(mixing + injection)
    errors_value.append(float(jnp.max(jnp.abs(cell.objective(z, x) - linear_value)
                                      / jnp.abs(linear_value))))
    errors_step.append(float(jnp.max(jnp.abs(cell(z, x)[0] - linear_step))
                             / jnp.max(jnp.abs(linear_step))))
  for errors in (errors_value, errors_step):
    assert errors[-1] < 1e-3
    # first order in γ: each tenfold decrease of γ shrinks the error about tenfold
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5, errors


def test_kernel_width_follows_point_two_over_m_per_sample(x64):
  x = 0.1 + jnp.abs(jax.random.normal(jax.random.PRNGKey(8), (4, 8, 8, 3), jnp.float64))
  gamma = opt.kernel_width(x)
  m = jnp.min(jnp.sum(x ** 2, axis=-1).reshape(4, -1), axis=1)
  np.testing.assert_allclose(gamma, 0.2 / m, rtol=1e-12)
  # per sample: changing one sample leaves the others' widths alone
  other = x.at[0].multiply(3.0)
  np.testing.assert_allclose(opt.kernel_width(other)[1:], gamma[1:], rtol=1e-12)
  np.testing.assert_allclose(opt.kernel_width(other)[0], gamma[0] / 9, rtol=1e-12)
  # a zero input position hits the documented floor instead of γ = ∞
  zeroed = x.at[1, 0, 0].set(0.0)
  floored = opt.kernel_width(zeroed)
  mean = jnp.mean(jnp.sum(zeroed[1] ** 2, axis=-1))
  np.testing.assert_allclose(floored[1], 0.2 / (1e-2 * mean), rtol=1e-9)
  # each GEQ branch uses its own input scale
  cell = make_cell("geq")
  operators = operators_of(cell, x)
  for level, branch in enumerate(operators["branches"]):
    np.testing.assert_allclose(branch["gamma"],
                               opt.kernel_width(ops_lib.resample(x, level)), rtol=1e-12)


def test_geq_rejects_norm_bounds_without_convexity_certificate():
  with pytest.raises(ValueError, match="convex"):
    opt.GEQConfig(max_norm=0.95, hidden_max_norm=0.9)
  with pytest.raises(ValueError, match="convex"):
    opt.GEQCell(3, (4,), max_norm=0.95, hidden_max_norm=0.9, rngs=nnx.Rngs(0))


# --- MOptEqs: perturbation ------------------------------------------------------------


def test_perturbation_is_pulled_back_toward_the_minimizer(x64):
  cell = make_cell("mopteqs")
  x = random_input(jax.random.PRNGKey(9))
  operators = operators_of(cell, x)
  z_star, _ = jax.jit(lambda z0, ops: jdeq.fixed_point(
      cell.objective_spec.update, z0, ops, solver=TIGHT))(cell.initial_state(x), operators)
  perturbed = cell.perturb(z_star, operators, key=jax.random.PRNGKey(0), size=0.1)
  for zi, pi in zip(z_star, perturbed):
    distance = jdeq.per_sample_norm(pi - zi)
    assert bool(jnp.all(distance > 0))
    # one step contracts the ε‖z*‖ perturbation by ≤ max(c², 2.5λ) = 0.81
    assert bool(jnp.all(distance <= 0.1 * 0.81 * jdeq.per_sample_norm(zi) + 1e-12))


# --- the models -------------------------------------------------------------------------


TINY = dict(image_shape=(8, 8, 3), stem_channels=8, channels=(4, 4), head_channels=4,
            num_classes=3)


@pytest.mark.slow  # ~60 s on 2 cores; the gradient checks exercise both models too
@pytest.mark.parametrize("family", ["mopteqs", "geq"])
def test_model_contract(family):
  model = models.create(f"{family}_cifar10", rngs=nnx.Rngs(0), **TINY)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  logits, aux = model(images, train=True, jac_probes=1)
  assert logits.shape == (2, 3) and aux.jac_loss.shape == (2,)
  assert aux.stats.nstep.shape == (2,) and bool(jnp.all(aux.jac_loss > 0))
  _, aux = model(images, train=False, budget=jnp.asarray(2, jnp.int32))
  assert bool(jnp.all(aux.stats.nstep <= 2)) and bool(jnp.all(aux.jac_loss == 0))
  logits_unrolled, _ = model(images, train=False, unrolled=True)
  assert logits_unrolled.shape == (2, 3)
  with pytest.raises(ValueError, match="expected images of shape"):
    model(jnp.zeros((2, 16, 16, 3)))
  with pytest.raises(ValueError, match="unknown option"):
    models.create(f"{family}_cifar10", rngs=nnx.Rngs(0), lambda_=0.1)


@pytest.mark.parametrize("family", ["mopteqs", "geq"])
def test_model_gradient_matches_finite_differences(x64, family):
  config = dataclasses.replace(
      models.get_config(f"{family}_cifar10"), **TINY, eval_solver=TIGHT,
      grad=jdeq.IFT(solver=TIGHT))
  model = to_float64(models.create(config, rngs=nnx.Rngs(1)))
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3), jnp.float64)
  weights = jax.random.normal(jax.random.PRNGKey(3), (2, 3), jnp.float64)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(images, train=False)
    return jnp.sum(weights * logits)

  gradient = jax.grad(loss)(params)
  direction = random_like(jax.random.PRNGKey(20), params)
  expected = directional_difference(loss, params, direction, eps=1e-6)
  np.testing.assert_allclose(tree_vdot(gradient, direction), expected, rtol=1e-6)


def test_parameter_counts_next_to_mdeq(capsys):
  counts = {name: nn.num_params(
                nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0))))
            for name in ("mdeq_cifar_tiny", "mdeq_cifar_large", "mopteqs_cifar10",
                         "geq_cifar10", "mopteqs_cifar100", "geq_cifar100")}
  with capsys.disabled():
    print("\nparameter counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
  # MOptEqs' claim: fewer parameters than MDEQ on CIFAR
  assert counts["mopteqs_cifar10"] < counts["mdeq_cifar_tiny"]
  assert counts["geq_cifar10"] < counts["mdeq_cifar_tiny"]

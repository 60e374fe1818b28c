"""MDEQ: parameter counts, forward/backward of the reference configs, IFT gradient
check, and convergence of the randomly initialised TINY on real CIFAR-10."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import models, nn
from jdeq.models import mdeq, mdeq_configs
from tests import helpers

MDEQ_NAMES = sorted(mdeq_configs.CONFIGS)
QUICK = dict(solver=jdeq.Broyden(max_iter=4, memory=4),
             eval_solver=jdeq.Broyden(max_iter=4, memory=4),
             grad=jdeq.IFT(jdeq.Broyden(max_iter=4, memory=4)), unrolled_steps=2)


_count = nn.num_params


def _abstract_params(name):
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  return nnx.state(abstract, nnx.Param)


def test_every_mdeq_config_has_a_reference_count():
  assert set(MDEQ_NAMES) == {
      "mdeq_cifar_tiny", "mdeq_cifar_large", "mdeq_imagenet_small",
      "mdeq_imagenet_large", "mdeq_imagenet_xl", "mdeq_cityscapes_small",
      "mdeq_cityscapes_large", "mdeq_cityscapes_xl"}
  for name in MDEQ_NAMES:
    assert models.reference(name) is not None, name


@pytest.mark.parametrize("name", [n for n in models.list_configs()
                                  if models.reference(n) is not None])
def test_parameter_count_matches_reference(name):
  count = _count(_abstract_params(name))
  expected = models.reference(name).params
  assert abs(count - expected) <= 0.02 * expected, (name, count, expected)


def test_tiny_parameter_breakdown():
  params = _abstract_params("mdeq_cifar_tiny")
  parts = {part: _count(params[part]) for part in ("stem", "deq", "head")}
  # Hand count from the reference yaml (docs/mdeq.md).
  assert parts == {"stem": 5_928, "deq": 111_696, "head": 41_266}


def test_reference_solver_settings():
  # The yaml thresholds count Broyden steps after the evaluation at z0; max_iter
  # counts evaluations, hence threshold + 1.
  tiny = models.get_config("mdeq_cifar_tiny")
  assert (tiny.solver.max_iter, tiny.grad.solver.max_iter, tiny.solver.stop_mode) == (
      18 + 1, 20 + 1, "rel")
  small = models.get_config("mdeq_imagenet_small")
  assert (small.solver.max_iter, small.grad.solver.max_iter, small.solver.stop_mode) == (
      26 + 1, 27 + 1, "abs")
  city = models.get_config("mdeq_cityscapes_small")
  assert (city.solver.max_iter, city.grad.solver.max_iter, city.head, city.dropout) == (
      27 + 1, 30 + 1, "segmentation", 0.05)
  xl = models.get_config("mdeq_imagenet_xl")
  assert (xl.expansion, xl.post_gn_affine) == (6, True)


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="num_groups"):
    mdeq.MDEQConfig(channels=(20, 24))
  with pytest.raises(ValueError, match="head_channels"):
    mdeq.MDEQConfig(channels=(24, 24, 24))
  with pytest.raises(ValueError, match="unknown option"):
    models.create("mdeq_cifar_tiny", rngs=nnx.Rngs(0), width=3)


def _forward_backward(model, images, **call):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest, copy=True)(images, **call)
    return jnp.mean(logits ** 2), (logits, aux)

  (value, (logits, aux)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(float(value))
  for part in ("stem", "deq", "head"):
    leaves = jax.tree.leaves(grads[part])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), part
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0, part
  return logits, aux


@pytest.fixture(scope="module")
def tiny_quick():
  return models.create("mdeq_cifar_tiny", rngs=nnx.Rngs(0), **QUICK)


def test_tiny_forward_backward(tiny_quick):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits, aux = _forward_backward(tiny_quick, images, train=True, jac_probes=1)
  assert logits.shape == (2, 10)
  assert aux.stats.nstep.shape == (2,) and aux.jac_loss.shape == (2,)


def test_tiny_under_nnx_jit_and_value_and_grad(tiny_quick):
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  labels = jnp.array([1, 2])

  @nnx.jit
  def step(model):
    def loss(model):
      logits, aux = model(images, train=True, unrolled=True)  # pretraining mode
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(2), labels]), aux
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (value, aux), grads = step(tiny_quick)
  assert np.isfinite(float(value))
  np.testing.assert_array_equal(aux.stats.nstep, 2)
  logits, aux = nnx.jit(lambda m: m(images, train=False, budget=jnp.asarray(3)))(
      tiny_quick)
  assert logits.shape == (2, 10)
  assert bool(jnp.all(aux.stats.nstep <= 3))
  with pytest.raises(ValueError, match="divisible"):
    tiny_quick(jnp.zeros((1, 31, 31, 3)), train=False)
  with pytest.raises(ValueError, match="channels"):
    tiny_quick(jnp.zeros((1, 32, 32, 1)), train=False)


@pytest.mark.slow  # ~35 s on 2 cores
def test_segmentation_variant_runs():
  """Fast stand-in for the Cityscapes model: same code, two narrow branches."""
  seg = models.create("mdeq_cityscapes_small", rngs=nnx.Rngs(0), channels=(8, 16),
                      num_groups=4, expansion=2, **QUICK)
  logits, _ = _forward_backward(seg, jnp.ones((1, 16, 24, 3)), train=True)
  assert logits.shape == (1, 16, 24, 19)


@pytest.mark.slow
def test_four_branch_narrow_variant_runs():
  """LARGE's four-branch code path at narrow widths."""
  large = models.create("mdeq_cifar_large", rngs=nnx.Rngs(0), channels=(8, 8, 16, 16),
                        num_groups=4, expansion=2, head_channels=(2, 2, 4, 4),
                        final_channels=16, **QUICK)
  logits, _ = _forward_backward(large, jnp.ones((2, 32, 32, 3)), train=True)
  assert logits.shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,out", [
    ("mdeq_cifar_large", (2, 32, 32, 3), (2, 10)),
    ("mdeq_cityscapes_small", (1, 64, 64, 3), (1, 64, 64, 19)),
])
def test_reference_size_forward_backward(name, shape, out):
  model = models.create(name, rngs=nnx.Rngs(0), **QUICK)
  logits, _ = _forward_backward(model, jnp.ones(shape), train=True)
  assert logits.shape == out


def test_small_mdeq_ift_gradient_matches_finite_differences(x64):
  """Whole-model float64 check: stem → 2-branch MDEQ (IFT) → head, 8×8 input.

  Training mode (stem BatchNorm on batch statistics, no dropout) is a deterministic
  function of the parameters. Broyden with a long memory solves the forward
  equilibrium and GMRES the backward linear system to ~1e-12 (a randomly
  initialised MDEQ is not contractive, so plain iteration would solve neither).
  """
  forward = jdeq.Broyden(max_iter=110, tol=1e-13, stop_mode="rel", memory=110)
  backward = jdeq.Krylov(method="gmres", max_iter=600, tol=1e-12, restart=300)
  config = mdeq.MDEQConfig(channels=(4, 8), num_groups=2, expansion=2, dropout=0.0,
                           head_channels=(2, 2), final_channels=6, num_classes=3,
                           solver=forward, eval_solver=forward,
                           grad=jdeq.IFT(backward))
  model = models.create(config, rngs=nnx.Rngs(2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  rest = jax.tree.map(lambda a: a.astype(jnp.float64)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, rest)
  images = jax.random.normal(jax.random.key(2), (2, 8, 8, 3), jnp.float64)
  weights = jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)

  def loss_and_stats(params):
    logits, aux = nnx.merge(graphdef, params, rest, copy=True)(images, train=True)
    return jnp.sum(weights * logits), aux.stats

  loss_and_stats = jax.jit(loss_and_stats)
  loss = lambda p: loss_and_stats(p)[0]
  _, stats = loss_and_stats(params)
  assert bool(jnp.all(stats.converged)), stats.rel_residual
  grad = jax.jit(jax.grad(lambda p: loss_and_stats(p)[0]))(params)
  for seed in range(2):
    # Perturb every parameter relative to its own scale: the reference init puts
    # many weights at ~0.01, where a unit-size step would leave the linear regime.
    direction = jax.tree.map(lambda r, p: r * (jnp.abs(p) + 1e-3),
                             helpers.random_like(jax.random.key(10 + seed), params),
                             params)
    numeric = helpers.directional_difference(loss, params, direction, eps=1e-6)
    analytic = helpers.tree_vdot(grad, direction)
    error = abs(float(analytic - numeric)) / abs(float(numeric))
    assert error < 1e-4, (seed, error)


RESIDUAL_FINDING = (
    "randomly initialised TINY is not contractive at the reference initialisation "
    "(spectral radius of J ≈ 1.4–2.6 per sample): Broyden within the reference "
    "budget stalls at rel. residual ≈ 0.1–0.45 in training mode, and the authors' "
    "own PyTorch code, run on the same images, stalls at 0.13–0.34 (docs/mdeq.md)")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=RESIDUAL_FINDING)
def test_random_tiny_converges_on_real_cifar10(tfds_data_dir):
  tfds = pytest.importorskip("tensorflow_datasets")
  data = tfds.as_numpy(tfds.load("cifar10", split="test[:32]", batch_size=-1,
                                 data_dir=str(tfds_data_dir)))
  mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
  images = ((data["image"] / 255.0 - mean) / std).astype(np.float32)
  model = models.create("mdeq_cifar_tiny", rngs=nnx.Rngs(0))
  _, aux = nnx.jit(lambda m, x: m(x, train=True))(model, images)
  residuals = np.asarray(aux.stats.rel_residual)
  report = ", ".join(f"{r:.3f}" for r in residuals)
  print(f"TINY per-sample relative residuals after {model.config.solver.max_iter} "
        f"evaluations: {report}")
  assert residuals.shape == (32,)
  assert np.all(residuals < 0.05), report

"""The small MLP / conv DEQs and the model registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import models
from jdeq.models import cells

QUICK = dict(solver=jdeq.Anderson(max_iter=12, tol=1e-3),
             eval_solver=jdeq.Anderson(max_iter=12, tol=1e-3),
             grad=jdeq.IFT(jdeq.Anderson(max_iter=8, tol=1e-3)))


@pytest.mark.parametrize("name,overrides", [
    ("mlp_deq_mnist", dict(width=16, hidden=24, dropout=0.1)),
    ("conv_deq_mnist", dict(channels=8, inner_channels=16, num_groups=4, dropout=0.1)),
    ("conv_deq_mnist", dict(channels=8, inner_channels=16, num_groups=4, pool=2,
                            stem_stride=2, head_width=16)),
])
def test_mnist_cells_forward_backward(name, overrides):
  model = models.create(name, rngs=nnx.Rngs(0), **overrides, **QUICK)
  images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  labels = jnp.arange(4)

  def loss(model):
    logits, aux = model(images, train=True)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, aux)

  (value, (logits, aux)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.shape == (4, 10) and np.isfinite(float(value))
  # From 1 at z0 = 0; a near-equilibrium within the short test budget.
  assert bool(jnp.all(aux.stats.rel_residual < 0.1)), aux.stats.rel_residual
  cell_grads = jax.tree.leaves(nnx.state(grads.deq.cell, nnx.Param))
  assert sum(float(jnp.abs(g).sum()) for g in cell_grads) > 0
  logits, _ = nnx.jit(lambda m: m(images, train=False))(model)
  assert logits.shape == (4, 10)
  with pytest.raises(ValueError, match="shape"):
    model(jnp.zeros((1, 32, 32, 3)), train=False)


def test_registry_lists_creates_and_validates():
  names = models.list_configs()
  assert {"mlp_deq_mnist", "conv_deq_mnist", "mdeq_cifar_tiny"} <= set(names)
  assert isinstance(models.get_config("conv_deq_mnist"), cells.ConvDEQConfig)
  with pytest.raises(ValueError, match="unknown model configuration"):
    models.get_config("no_such_model")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['widht'\]"):
    models.create("mlp_deq_mnist", rngs=nnx.Rngs(0), widht=3)
  with pytest.raises(ValueError, match="already exists"):
    models.register("mlp_deq_mnist", cells.MLPDEQConfig())
  with pytest.raises(ValueError, match="needs its source"):
    models.register("unused_name", cells.MLPDEQConfig(), reference_params=10)
  with pytest.raises(ValueError, match="model config"):
    models.register("unused_name", object())
  with pytest.raises(ValueError, match="pool"):
    cells.ConvDEQConfig(pool=5)
  with pytest.raises(ValueError, match="head_width"):
    cells.ConvDEQConfig(head_width=-1)

"""Image classifiers around an optimization-induced cell (MOptEqs, GEQ).

``images → stem → x → z* = argmin_z G(z; x) (solved as z* = T(z*)) → fusion head → logits``

The model follows the jdeq model contract::

  logits, aux = model(images, train=True, unrolled=False, budget=None, jac_probes=0)

with ``aux`` a :class:`jdeq.nn.DEQAux`. The equilibrium is solved by
:class:`jdeq.nn.DEQ`, which builds the cell's operators (spectrally normalized
weights, injections, kernel widths) once per forward pass, so every solver iteration
and the backward pass see the same objective.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq.models.optimization import operators as ops_lib
from jdeq.nn import DEQ, Conv, DEQAux, WeightNorm, group_norm


def group_count(channels: int, preferred: int = 8) -> int:
  """The largest divisor of ``channels`` that is at most ``preferred``."""
  return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


class Stem(nnx.Module):
  """Two conv3×3–GroupNorm–ReLU layers; ``stride`` 1 (CIFAR), 2 or 4 (ImageNet-like:
  stride 2 in each conv)."""

  def __init__(self, in_channels: int, channels: int, *, stride: int,
               rngs: nnx.Rngs):
    strides = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[stride]
    self.convs = nnx.List([
        Conv(c_in, channels, (3, 3), strides=s, padding="SAME", use_bias=False,
             rngs=rngs)
        for c_in, s in zip((in_channels, channels), strides)])
    self.norms = nnx.List([group_norm(channels, group_count(channels), rngs=rngs)
                           for _ in strides])

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x)))
    return x


class FusionHead(nnx.Module):
  """Branch fusion and classifier.

  Each branch is mapped to ``channels`` by a weight-normalized 1×1 convolution,
  brought to the finest resolution by nearest upsampling, and the branches are
  averaged; then GroupNorm–ReLU, global average pooling, dropout and a linear
  classifier.
  """

  def __init__(self, branch_channels: Sequence[int], channels: int,
               num_classes: int, *, dropout: float, rngs: nnx.Rngs):
    self.projections = nnx.List([WeightNorm(Conv(c, channels, (1, 1), rngs=rngs))
                                 for c in branch_channels])
    self.norm = group_norm(channels, group_count(channels), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, z: Sequence[jax.Array], *, train: bool) -> jax.Array:
    fused = sum(ops_lib.resample(projection(zi), -level)
                for level, (projection, zi) in enumerate(zip(self.projections, z)))
    features = jax.nn.relu(self.norm(fused / len(z))).mean(axis=(1, 2))
    return self.classifier(self.dropout(features, deterministic=not train))


class OptimizationClassifier(nnx.Module):
  """Stem, an optimization-induced cell solved to its equilibrium, fusion head.

  Built from a :class:`~jdeq.models.optimization.MOptEqsConfig` or
  :class:`~jdeq.models.optimization.GEQConfig` (``config.build(rngs=...)``).
  Randomness: dropout and the perturbation strategy draw from the ``"dropout"``
  stream, the Hutchinson probes from the ``"jacobian"`` stream of ``rngs``, which the
  model keeps, so checkpoints resume them exactly.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    in_channels = config.image_shape[2]
    self.stem = Stem(in_channels, config.stem_channels, stride=config.stem_stride,
                     rngs=rngs)
    self.deq = DEQ(config.make_cell(rngs=rngs), solver=config.solver,
                   eval_solver=config.eval_solver, grad=config.grad,
                   unrolled_steps=config.unrolled_steps)
    self.head = FusionHead(config.channels, config.head_channels, config.num_classes,
                           dropout=config.dropout, rngs=rngs)
    self.rngs = rngs

  @property
  def cell(self):
    """The optimization-induced cell (``objective``, ``stationarity``, ...)."""
    return self.deq.cell

  def features(self, images: jax.Array) -> jax.Array:
    """The stem output ``x``, the cell's input."""
    config = self.config
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(config.image_shape):
      raise ValueError(f"{type(self).__name__}: expected images of shape "
                       f"(B, {', '.join(map(str, config.image_shape))}), got "
                       f"{tuple(images.shape)}")
    return self.stem(images)

  def __call__(self, images: jax.Array, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None, jac_probes: int = 0
               ) -> tuple[jax.Array, DEQAux]:
    """Logits ``(B, num_classes)`` and ``DEQAux(stats, jac_loss)``.

    Args:
      images: ``(B, H, W, C)`` with ``(H, W, C)`` the configured ``image_shape``.
      train: dropout, perturbation and the training solver budget; else the
        evaluation budget, deterministic.
      unrolled: ordinary backprop through ``unrolled_steps`` cell steps from ``z0``
        ("pretraining") instead of the equilibrium gradient.
      budget: optional traced forward budget ``<= solver.max_iter``.
      jac_probes: > 0 adds the Hutchinson estimate of ``‖J‖²_F / d`` at ``z*``.
    """
    x = self.features(images)
    z_star, aux = self.deq(
        x, train=train, unrolled=unrolled, budget=budget, jac_probes=jac_probes,
        jacobian_key=self.rngs.jacobian() if jac_probes else None)
    if train and self.config.perturbation_size > 0:
      z_star = self.cell.perturb(z_star, self.cell.operators(x),
                                 key=self.rngs.dropout(),
                                 size=self.config.perturbation_size)
    return self.head(z_star, train=train), aux


def count_parameters(model: nnx.Module) -> int:
  """Number of scalar parameters (``nnx.Param`` leaves)."""
  return sum(math.prod(leaf.shape) for leaf in
             jax.tree.leaves(nnx.state(model, nnx.Param)))

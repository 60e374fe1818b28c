"""Image classifiers around an optimization-induced cell (MOptEqs, GEQ).

``images → stem → x → z* = argmin_z G(z; x) (solved as z* = T(z*)) → fusion head → logits``

The model is a :class:`jdeq.nn.DEQNetwork`, so it follows the model contract
(:class:`jdeq.nn.EquilibriumModel`). Its :class:`jdeq.nn.DEQ` builds the cell's
operators (spectrally normalized weights, injections, kernel widths) once per
forward pass, so every solver iteration and the backward pass see the same objective.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq.models.optimization import operators as ops_lib
from jdeq.nn import Conv, DEQNetwork, WeightNorm, group_norm


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

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    del train  # GroupNorm only: the same in both modes
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


class OptimizationClassifier(DEQNetwork):
  """Stem, an optimization-induced cell solved to its equilibrium, fusion head.

  Built from a :class:`~jdeq.models.optimization.MOptEqsConfig` or
  :class:`~jdeq.models.optimization.GEQConfig` (``config.build(rngs=...)``).
  Randomness: dropout and the perturbation strategy draw from the ``"dropout"``
  stream, the Hutchinson probes from the ``"jacobian"`` stream of ``rngs``, which the
  model keeps, so checkpoints resume them exactly.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    stem = Stem(config.image_shape[2], config.stem_channels, stride=config.stem_stride,
                rngs=rngs)
    cell = config.make_cell(rngs=rngs)
    head = FusionHead(config.channels, config.head_channels, config.num_classes,
                      dropout=config.dropout, rngs=rngs)
    super().__init__(config, stem, cell, head, rngs=rngs,
                     input_shape=config.image_shape)

  @property
  def cell(self):
    """The optimization-induced cell (``objective``, ``stationarity``, ...)."""
    return self.deq.cell

  def features(self, images: jax.Array) -> jax.Array:
    """The stem output ``x``, the cell's input."""
    self.check_input(images)
    return self.stem(images, train=False)

  def refine(self, z_star, injection, *, train: bool):
    """In training, the perturbation strategy (``perturbation_size > 0``) moves
    ``z*`` within the objective's basin (see ``OptimizationCell.perturb``)."""
    if train and self.config.perturbation_size > 0:
      z_star = self.cell.perturb(z_star, self.cell.operators(injection),
                                 key=self.rngs.dropout(),
                                 size=self.config.perturbation_size)
    return z_star

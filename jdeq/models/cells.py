"""Small equilibrium cells for quick experiments and tests, with MNIST classifiers.

* :class:`MLPCell` — on feature vectors ``(B, D)``:

    f(z, x) = LN(ReLU(z + LN(x + W₂ drop(ReLU(LN(W₁ z)))))).

* :class:`ConvCell` — the single-resolution conv DEQ used on MNIST (the
  implicit-layers tutorial's residual cell), on NHWC maps:

    f(z, x) = GN(ReLU(z + GN(x + conv₂(drop(ReLU(GN(conv₁ z))))))).

Both weight-normalize their two linear maps and use variational dropout, prepared
once per forward pass like MDEQ's cell. The normalizations are per sample, so the
map is independent across the batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdeq
from jdeq import nn
from jdeq._src.config import config, require, require_positive
from jdeq._src.gradients import GradientMode
from jdeq._src.solvers.base import AbstractSolver
from jdeq.models.registry import ModelConfig, register


class MLPCell(nn.EquilibriumCell):
  """The fully connected residual cell (see the module docstring)."""

  def __init__(self, width: int, hidden: int, *, dropout: float = 0.0,
               rngs: nnx.Rngs):
    self.dropout = dropout
    self.hidden = hidden
    self.linear1 = nn.WeightNorm(nnx.Linear(width, hidden, use_bias=False, rngs=rngs))
    self.linear2 = nn.WeightNorm(nnx.Linear(hidden, width, use_bias=False, rngs=rngs))
    self.norm1 = nnx.LayerNorm(hidden, epsilon=nn.NORM_EPSILON, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, epsilon=nn.NORM_EPSILON, rngs=rngs)
    self.norm3 = nnx.LayerNorm(width, epsilon=nn.NORM_EPSILON, rngs=rngs)

  def prepare(self, injection, *, train, key):
    mask = None
    if train and self.dropout > 0:
      if key is None:
        raise ValueError("MLPCell: training with dropout needs a dropout key")
      mask = nn.variational_dropout_mask(key, injection.shape[0], self.hidden,
                                         self.dropout, spatial_dims=0,
                                         dtype=injection.dtype)
    return dict(linear1=self.linear1.weight(), linear2=self.linear2.weight(), mask=mask)

  def __call__(self, z, injection, prepared):
    y = jax.nn.relu(self.norm1(self.linear1(z, prepared["linear1"])))
    if prepared["mask"] is not None:
      y = y * prepared["mask"]
    y = self.norm2(injection + self.linear2(y, prepared["linear2"]))
    return self.norm3(jax.nn.relu(z + y))


class ConvCell(nn.EquilibriumCell):
  """The single-resolution residual conv cell (see the module docstring)."""

  def __init__(self, channels: int, inner_channels: int, *, num_groups: int = 8,
               kernel_size: int = 3, dropout: float = 0.0, rngs: nnx.Rngs):
    self.dropout = dropout
    self.inner_channels = inner_channels
    kernel = (kernel_size, kernel_size)
    init = nnx.initializers.normal(0.01)  # small: the cell starts close to contractive
    self.conv1 = nn.WeightNorm(nn.Conv(channels, inner_channels, kernel, use_bias=False,
                                        kernel_init=init, rngs=rngs))
    self.conv2 = nn.WeightNorm(nn.Conv(inner_channels, channels, kernel, use_bias=False,
                                        kernel_init=init, rngs=rngs))
    self.norm1 = nn.group_norm(inner_channels, num_groups, rngs=rngs)
    self.norm2 = nn.group_norm(channels, num_groups, rngs=rngs)
    self.norm3 = nn.group_norm(channels, num_groups, rngs=rngs)

  def prepare(self, injection, *, train, key):
    mask = None
    if train and self.dropout > 0:
      if key is None:
        raise ValueError("ConvCell: training with dropout needs a dropout key")
      mask = nn.variational_dropout_mask(key, injection.shape[0], self.inner_channels,
                                         self.dropout, dtype=injection.dtype)
    return dict(conv1=self.conv1.weight(), conv2=self.conv2.weight(), mask=mask)

  def __call__(self, z, injection, prepared):
    y = jax.nn.relu(self.norm1(self.conv1(z, prepared["conv1"])))
    if prepared["mask"] is not None:
      y = y * prepared["mask"]
    y = self.norm2(injection + self.conv2(y, prepared["conv2"]))
    return self.norm3(jax.nn.relu(z + y))


def _default_solver():
  return jdeq.Anderson(max_iter=30, tol=1e-3, stop_mode="rel", m=5)


def _default_grad():
  return jdeq.IFT(jdeq.Anderson(max_iter=30, tol=1e-4, stop_mode="rel"))


@config
class MLPDEQConfig(ModelConfig):
  """An MLP DEQ classifier: flatten → Linear injection → DEQ(MLPCell) → Linear.

  Attributes:
    image_shape: ``(H, W, C)`` of the inputs.
    num_classes: output classes.
    width: state width ``D``.
    hidden: hidden width of the cell.
    dropout: variational dropout rate in the cell.
    unrolled_steps, solver, eval_solver, grad: as for :class:`jdeq.nn.DEQ`.
  """
  image_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  width: int = 128
  hidden: int = 256
  dropout: float = 0.0
  unrolled_steps: int = 10
  solver: AbstractSolver = _default_solver()
  eval_solver: AbstractSolver = _default_solver()
  grad: GradientMode = _default_grad()

  def __post_init__(self) -> None:
    object.__setattr__(self, "image_shape", tuple(self.image_shape))
    require_positive(self, num_classes=self.num_classes, width=self.width,
                     hidden=self.hidden, unrolled_steps=self.unrolled_steps)
    require(0.0 <= self.dropout < 1.0, self, f"dropout must be in [0, 1), got "
            f"{self.dropout!r}")

  def build(self, *, rngs: nnx.Rngs) -> "DEQClassifier":
    stem = _FlattenLinear(int(np.prod(self.image_shape)), self.width, rngs=rngs)
    cell = MLPCell(self.width, self.hidden, dropout=self.dropout, rngs=rngs)
    head = _VectorHead(self.width, self.num_classes, rngs=rngs)
    return DEQClassifier(self, stem, cell, head, rngs=rngs)


@config
class ConvDEQConfig(ModelConfig):
  """A conv DEQ classifier: conv–BN stem → DEQ(ConvCell) → BN, pool, Linear.

  Attributes:
    image_shape: ``(H, W, C)`` of the inputs (H and W divisible by ``pool``).
    num_classes: output classes.
    channels: state channels.
    inner_channels: hidden channels of the cell.
    num_groups: GroupNorm groups.
    stem_stride: stride of the stem convolution; 2 solves the equilibrium at half
      the resolution (4x cheaper per iteration).
    pool: average-pooling window (and stride) of the head, on the state map.
    dropout: variational dropout rate in the cell.
    unrolled_steps, solver, eval_solver, grad: as for :class:`jdeq.nn.DEQ`.
  """
  image_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  channels: int = 48
  inner_channels: int = 64
  num_groups: int = 8
  stem_stride: int = 1
  pool: int = 7
  dropout: float = 0.0
  unrolled_steps: int = 10
  solver: AbstractSolver = _default_solver()
  eval_solver: AbstractSolver = _default_solver()
  grad: GradientMode = _default_grad()

  def __post_init__(self) -> None:
    object.__setattr__(self, "image_shape", tuple(self.image_shape))
    require(len(self.image_shape) == 3, self,
            f"image_shape must be (H, W, C), got {self.image_shape}")
    require_positive(self, num_classes=self.num_classes, channels=self.channels,
                     inner_channels=self.inner_channels, num_groups=self.num_groups,
                     pool=self.pool, unrolled_steps=self.unrolled_steps)
    require(self.stem_stride in (1, 2), self,
            f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
    state_size = [-(-size // self.stem_stride) for size in self.image_shape[:2]]
    require(state_size[0] % self.pool == 0 and state_size[1] % self.pool == 0, self,
            f"pool={self.pool} must divide the state size {tuple(state_size)}")
    require(0.0 <= self.dropout < 1.0, self, f"dropout must be in [0, 1), got "
            f"{self.dropout!r}")

  def build(self, *, rngs: nnx.Rngs) -> "DEQClassifier":
    height, width, in_channels = self.image_shape
    height, width = -(-height // self.stem_stride), -(-width // self.stem_stride)
    stem = _ConvStem(in_channels, self.channels, stride=self.stem_stride, rngs=rngs)
    cell = ConvCell(self.channels, self.inner_channels, num_groups=self.num_groups,
                    dropout=self.dropout, rngs=rngs)
    pooled = (height // self.pool) * (width // self.pool) * self.channels
    head = _ConvHead(self.channels, self.pool, pooled, self.num_classes, rngs=rngs)
    return DEQClassifier(self, stem, cell, head, rngs=rngs)


class _FlattenLinear(nnx.Module):
  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, rngs=rngs)

  def __call__(self, images, *, train):
    del train
    return self.linear(images.reshape(images.shape[0], -1))


class _VectorHead(nnx.Module):
  def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, z, *, train):
    del train
    return self.linear(z)


class _ConvStem(nnx.Module):
  def __init__(self, in_channels: int, channels: int, *, stride: int = 1,
               rngs: nnx.Rngs):
    self.conv = nn.Conv(in_channels, channels, (3, 3), strides=stride, use_bias=False,
                        rngs=rngs)
    self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=nn.NORM_EPSILON, rngs=rngs)

  def __call__(self, images, *, train):
    return self.norm(self.conv(images), use_running_average=not train)


class _ConvHead(nnx.Module):
  def __init__(self, channels: int, pool: int, pooled_features: int, num_classes: int,
               *, rngs: nnx.Rngs):
    self.pool = pool
    self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=nn.NORM_EPSILON, rngs=rngs)
    self.linear = nnx.Linear(pooled_features, num_classes, rngs=rngs)

  def __call__(self, z, *, train):
    y = self.norm(z, use_running_average=not train)
    window = (self.pool, self.pool)
    y = nnx.avg_pool(y, window, strides=window)
    return self.linear(y.reshape(y.shape[0], -1))


class DEQClassifier(nnx.Module):
  """``stem`` → ``deq`` → ``head`` around a single-state cell (the small models).

  Follows the model call contract of :class:`jdeq.models.MDEQ`.
  """

  def __init__(self, cfg: ModelConfig, stem: nnx.Module, cell: nn.EquilibriumCell,
               head: nnx.Module, *, rngs: nnx.Rngs):
    self.config = cfg
    self.stem = stem
    self.deq = nn.DEQ(cell, solver=cfg.solver, eval_solver=cfg.eval_solver,
                      grad=cfg.grad, unrolled_steps=cfg.unrolled_steps)
    self.head = head
    self.rngs = rngs

  def __call__(self, images: jax.Array, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, nn.DEQAux]:
    expected = tuple(self.config.image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"{type(self.config).__name__} model expects images of shape "
                       f"(B, {', '.join(map(str, expected))}), got {images.shape}")
    x = self.stem(images, train=train)
    z_star, aux = self.deq.call_with_rngs(
        x, self.rngs, train=train, unrolled=unrolled, budget=budget,
        jac_probes=jac_probes, uses_dropout=self.config.dropout > 0)
    return self.head(z_star, train=train), aux


register("mlp_deq_mnist", MLPDEQConfig())
register("conv_deq_mnist", ConvDEQConfig())

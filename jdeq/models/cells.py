"""Small equilibrium cells for quick experiments and tests, with MNIST classifiers.

* :class:`MLPCell` — on feature vectors ``(B, D)``:

    f(z, x) = LN(ReLU(z + LN(x + W₂ drop(ReLU(LN(W₁ z)))))).

* :class:`ConvCell` — the single-resolution conv DEQ used on MNIST (the
  implicit-layers tutorial's residual cell), on NHWC maps:

    f(z, x) = GN(ReLU(z + GN(x + conv₂(drop(ReLU(GN(conv₁ z))))))).

Both are a :class:`ResidualCell`: they weight-normalize their two linear maps and
use variational dropout, prepared once per forward pass like MDEQ's cell. The
normalizations are per sample, so the map is independent across the batch. The
classifiers (:class:`MLPDEQConfig`, :class:`ConvDEQConfig`) are
:class:`jdeq.nn.DEQNetwork` shells around them.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import jdeq
from jdeq import AbstractSolver, GradientMode, config, nn, require, require_positive
from jdeq.models.registry import ModelConfig, register


class ResidualCell(nn.EquilibriumCell):
  """The residual cell of both small models, around two linear maps ``L₁``, ``L₂``:

    f(z, x) = N₃(ReLU(z + N₂(x + L₂ drop(ReLU(N₁(L₁ z)))))).

  ``L₁`` and ``L₂`` (dense or convolutional, without bias) are weight-normalized and
  the dropout mask is per sample and channel; both are prepared once per forward
  pass. The normalizations ``N₁, N₂, N₃`` are per sample.
  """

  def __init__(self, layer1: nnx.Module, layer2: nnx.Module, norm1: nnx.Module,
               norm2: nnx.Module, norm3: nnx.Module, *, hidden: int, dropout: float,
               mask_spatial_dims: int):
    """Wraps the given layers (built by the subclass, in parameter-init order).

    Args:
      layer1, layer2: ``L₁`` (state → hidden) and ``L₂`` (hidden → state).
      norm1, norm2, norm3: ``N₁`` (hidden), ``N₂`` and ``N₃`` (state).
      hidden: the hidden width (channels of the dropout mask).
      dropout: variational dropout rate on the hidden features.
      mask_spatial_dims: spatial axes of the hidden features (0 dense, 2 NHWC).
    """
    self.dropout = dropout
    self.hidden = hidden
    self.mask_spatial_dims = mask_spatial_dims
    self.layer1 = nn.WeightNorm(layer1)
    self.layer2 = nn.WeightNorm(layer2)
    self.norm1 = norm1
    self.norm2 = norm2
    self.norm3 = norm3

  def prepare(self, injection, *, train, key):
    mask = None
    if train and self.dropout > 0:
      if key is None:
        raise ValueError(f"{type(self).__name__}: training with dropout needs a "
                         f"dropout key")
      mask = nn.variational_dropout_mask(key, injection.shape[0], self.hidden,
                                         self.dropout,
                                         spatial_dims=self.mask_spatial_dims,
                                         dtype=injection.dtype)
    return dict(layer1=self.layer1.weight(), layer2=self.layer2.weight(), mask=mask)

  def __call__(self, z, injection, prepared):
    y = jax.nn.relu(self.norm1(self.layer1(z, prepared["layer1"])))
    if prepared["mask"] is not None:
      y = y * prepared["mask"]
    y = self.norm2(injection + self.layer2(y, prepared["layer2"]))
    return self.norm3(jax.nn.relu(z + y))


class MLPCell(ResidualCell):
  """The fully connected residual cell on ``(B, D)``: dense maps, LayerNorms."""

  def __init__(self, width: int, hidden: int, *, dropout: float = 0.0,
               rngs: nnx.Rngs):
    super().__init__(
        nnx.Linear(width, hidden, use_bias=False, rngs=rngs),
        nnx.Linear(hidden, width, use_bias=False, rngs=rngs),
        nnx.LayerNorm(hidden, epsilon=nn.NORM_EPSILON, rngs=rngs),
        nnx.LayerNorm(width, epsilon=nn.NORM_EPSILON, rngs=rngs),
        nnx.LayerNorm(width, epsilon=nn.NORM_EPSILON, rngs=rngs),
        hidden=hidden, dropout=dropout, mask_spatial_dims=0)


class ConvCell(ResidualCell):
  """The single-resolution residual conv cell on NHWC maps: convs, GroupNorms."""

  def __init__(self, channels: int, inner_channels: int, *, num_groups: int = 8,
               kernel_size: int = 3, dropout: float = 0.0, rngs: nnx.Rngs):
    kernel = (kernel_size, kernel_size)
    init = nnx.initializers.normal(0.01)  # small: the cell starts close to contractive
    super().__init__(
        nn.Conv(channels, inner_channels, kernel, use_bias=False, kernel_init=init,
                rngs=rngs),
        nn.Conv(inner_channels, channels, kernel, use_bias=False, kernel_init=init,
                rngs=rngs),
        nn.group_norm(inner_channels, num_groups, rngs=rngs),
        nn.group_norm(channels, num_groups, rngs=rngs),
        nn.group_norm(channels, num_groups, rngs=rngs),
        hidden=inner_channels, dropout=dropout, mask_spatial_dims=2)


def _default_solver():
  return jdeq.Anderson(max_iter=30, tol=1e-3, stop_mode="rel", m=5)


def _default_grad():
  return jdeq.IFT(jdeq.Anderson(max_iter=30, tol=1e-4, stop_mode="rel"))


@config
class SmallDEQConfig(ModelConfig):
  """Fields shared by the small classifiers (stem → DEQ(cell) → head).

  Attributes:
    image_shape: ``(H, W, C)`` of the inputs.
    num_classes: output classes.
    dropout: variational dropout rate in the cell.
    unrolled_steps, solver, eval_solver, grad: as for :class:`jdeq.nn.DEQ`.
  """
  image_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  dropout: float = 0.0
  unrolled_steps: int = 10
  solver: AbstractSolver = _default_solver()
  eval_solver: AbstractSolver = _default_solver()
  grad: GradientMode = _default_grad()

  def __post_init__(self) -> None:
    object.__setattr__(self, "image_shape", tuple(self.image_shape))
    require_positive(self, num_classes=self.num_classes,
                     unrolled_steps=self.unrolled_steps)
    require(0.0 <= self.dropout < 1.0, self, f"dropout must be in [0, 1), got "
            f"{self.dropout!r}")

  def classifier(self, stem: nnx.Module, cell: nn.EquilibriumCell, head: nnx.Module,
                 *, rngs: nnx.Rngs) -> nn.DEQNetwork:
    """The model around the stages (built in that order by ``build``)."""
    return nn.DEQNetwork(self, stem, cell, head, rngs=rngs,
                         input_shape=self.image_shape, cell_dropout=self.dropout > 0)


@config
class MLPDEQConfig(SmallDEQConfig):
  """An MLP DEQ classifier: flatten → Linear injection → DEQ(MLPCell) → Linear.

  Attributes:
    width: state width ``D``.
    hidden: hidden width of the cell.
    (and the fields of :class:`SmallDEQConfig`)
  """
  width: int = 128
  hidden: int = 256

  def __post_init__(self) -> None:
    super().__post_init__()
    require_positive(self, width=self.width, hidden=self.hidden)

  def build(self, *, rngs: nnx.Rngs) -> nn.DEQNetwork:
    stem = _FlattenLinear(int(np.prod(self.image_shape)), self.width, rngs=rngs)
    cell = MLPCell(self.width, self.hidden, dropout=self.dropout, rngs=rngs)
    head = _VectorHead(self.width, self.num_classes, rngs=rngs)
    return self.classifier(stem, cell, head, rngs=rngs)


@config
class ConvDEQConfig(SmallDEQConfig):
  """A conv DEQ classifier: conv–BN stem → DEQ(ConvCell) → BN, ReLU, pool, [Linear, ReLU,] Linear.

  Attributes:
    channels: state channels.
    inner_channels: hidden channels of the cell.
    num_groups: GroupNorm groups.
    stem_stride: stride of the stem convolution; 2 solves the equilibrium at half
      the resolution (4x cheaper per iteration).
    pool: average-pooling window (and stride) of the head, on the state map (it
      must divide the state's height and width).
    head_width: width of a hidden ReLU layer between the pooled features and the
      classifier; 0 (the default) feeds the pooled features to it directly.
    (and the fields of :class:`SmallDEQConfig`)
  """
  channels: int = 48
  inner_channels: int = 64
  num_groups: int = 8
  stem_stride: int = 1
  pool: int = 7
  head_width: int = 0

  def __post_init__(self) -> None:
    super().__post_init__()
    require(len(self.image_shape) == 3, self,
            f"image_shape must be (H, W, C), got {self.image_shape}")
    require_positive(self, channels=self.channels,
                     inner_channels=self.inner_channels, num_groups=self.num_groups,
                     pool=self.pool)
    require(self.head_width >= 0, self,
            f"head_width must be 0 or positive, got {self.head_width!r}")
    require(self.stem_stride in (1, 2), self,
            f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
    state_size = [-(-size // self.stem_stride) for size in self.image_shape[:2]]
    require(state_size[0] % self.pool == 0 and state_size[1] % self.pool == 0, self,
            f"pool={self.pool} must divide the state size {tuple(state_size)}")

  def build(self, *, rngs: nnx.Rngs) -> nn.DEQNetwork:
    height, width, in_channels = self.image_shape
    height, width = -(-height // self.stem_stride), -(-width // self.stem_stride)
    stem = _ConvStem(in_channels, self.channels, stride=self.stem_stride, rngs=rngs)
    cell = ConvCell(self.channels, self.inner_channels, num_groups=self.num_groups,
                    dropout=self.dropout, rngs=rngs)
    pooled = (height // self.pool) * (width // self.pool) * self.channels
    head = _ConvHead(self.channels, self.pool, pooled, self.num_classes,
                     hidden=self.head_width, rngs=rngs)
    return self.classifier(stem, cell, head, rngs=rngs)


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
  """BN → ReLU → average pooling → [Linear → ReLU] → Linear, as ResNet heads."""

  def __init__(self, channels: int, pool: int, pooled_features: int, num_classes: int,
               *, hidden: int = 0, rngs: nnx.Rngs):
    self.pool = pool
    self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=nn.NORM_EPSILON, rngs=rngs)
    self.hidden = (nnx.Linear(pooled_features, hidden, rngs=rngs) if hidden else None)
    self.linear = nnx.Linear(hidden or pooled_features, num_classes, rngs=rngs)

  def __call__(self, z, *, train):
    y = jax.nn.relu(self.norm(z, use_running_average=not train))
    window = (self.pool, self.pool)
    y = nnx.avg_pool(y, window, strides=window).reshape(z.shape[0], -1)
    if self.hidden is not None:
      y = jax.nn.relu(self.hidden(y))
    return self.linear(y)


register("mlp_deq_mnist", MLPDEQConfig())
register("conv_deq_mnist", ConvDEQConfig())

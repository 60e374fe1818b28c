"""Building blocks for multi-resolution states (lists of NHWC tensors).

Branch ``i`` of a multi-resolution state has ``H / 2^i × W / 2^i`` pixels. These
modules move features between branches the way MDEQ (and HRNet before it) does;
they are shared by every multi-resolution model of jdeq.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq.nn.conv import Conv
from jdeq.nn.group_norm import GroupNorm

Initializer = Callable[..., jax.Array]

#: PyTorch's GroupNorm/BatchNorm epsilon, used throughout to match the references.
NORM_EPSILON = 1e-5


def group_norm(channels: int, num_groups: int, *, affine: bool = True,
               rngs: nnx.Rngs) -> GroupNorm:
  """A per-sample GroupNorm over NHWC features (no batch statistics)."""
  return GroupNorm(channels, num_groups, epsilon=NORM_EPSILON, affine=affine, rngs=rngs)


def nearest_upsample(x: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of NHWC ``x`` by an integer ``factor``."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def bilinear_resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC ``x`` to ``height × width`` (half-pixel centres)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")


class UpsampleFusion(nnx.Module):
  """Coarse branch ``j`` → finer branch ``i``: 1×1 conv → GroupNorm → nearest ×2^(j−i)."""

  def __init__(self, in_channels: int, out_channels: int, levels: int, *,
               num_groups: int, affine: bool = True, kernel_init: Initializer,
               rngs: nnx.Rngs):
    self.factor = 2 ** levels
    self.conv = Conv(in_channels, out_channels, (1, 1), use_bias=False,
                         kernel_init=kernel_init, rngs=rngs)
    self.norm = group_norm(out_channels, num_groups, affine=affine, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nearest_upsample(self.norm(self.conv(x)), self.factor)


class DownsampleFusion(nnx.Module):
  """Fine branch ``j`` → coarser branch ``i``: ``i − j`` stride-2 3×3 convs.

  Each conv is followed by GroupNorm, with a ReLU between convs but not after the
  last; channels stay ``in_channels`` until the last conv outputs ``out_channels``.
  Padding is one pixel on every side (PyTorch's ``padding=1``), so ``H → H / 2``
  exactly for even ``H``.
  """

  def __init__(self, in_channels: int, out_channels: int, levels: int, *,
               num_groups: int, affine: bool = True, kernel_init: Initializer,
               rngs: nnx.Rngs):
    widths = [in_channels] * levels + [out_channels]
    self.convs = nnx.List([
        Conv(widths[k], widths[k + 1], (3, 3), strides=2, padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=kernel_init, rngs=rngs)
        for k in range(levels)])
    self.norms = nnx.List([group_norm(widths[k + 1], num_groups, affine=affine, rngs=rngs)
                           for k in range(levels)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = norm(conv(x))
      if k < len(self.convs) - 1:
        x = jax.nn.relu(x)
    return x


class MultiscaleFusion(nnx.Module):
  """Every branch receives the sum of all branches, resampled to its resolution.

  ``y_i = Σ_j T_ij(x_j)`` with ``T_ii`` the identity, ``T_ij`` an
  :class:`UpsampleFusion` for coarser ``j > i`` and a :class:`DownsampleFusion` for
  finer ``j < i``.
  """

  def __init__(self, channels: Sequence[int], *, num_groups: int, affine: bool = True,
               kernel_init: Initializer, rngs: nnx.Rngs):
    self.num_branches = len(channels)

    def transform(i, j):
      if i == j:
        return None
      kind = UpsampleFusion if j > i else DownsampleFusion
      return kind(channels[j], channels[i], abs(j - i), num_groups=num_groups,
                  affine=affine, kernel_init=kernel_init, rngs=rngs)

    self.transforms = nnx.List([
        nnx.List([transform(i, j) for j in range(self.num_branches)])
        for i in range(self.num_branches)])

  def __call__(self, xs: Sequence[jax.Array]) -> list[jax.Array]:
    if len(xs) != self.num_branches:
      raise ValueError(f"MultiscaleFusion expects {self.num_branches} branches, "
                       f"got {len(xs)}")
    fused = []
    for i, row in enumerate(self.transforms):
      total = xs[i]
      for j, transform in enumerate(row):
        if transform is not None:
          total = total + transform(xs[j])
      fused.append(total)
    return fused

"""Multiscale Deep Equilibrium models (Bai, Koltun & Kolter, NeurIPS 2020).

The architecture follows the authors' MDEQ-Vision code (locuslab/deq), module for
module, so that every parameter of the reference has its counterpart here:

* **stem** — conv3×3–BN–ReLU–conv3×3–BN–ReLU (stride 2 in each conv when the input
  is downsampled, as for ImageNet/Cityscapes), then, when the input is downsampled
  or there are more than two branches, a 1×1 conv–BN–ReLU "injection" layer. Its
  output ``x`` is injected into the highest-resolution branch only.
* **equilibrium cell** (:class:`MDEQCell`) — the state is a list of NHWC tensors,
  branch ``i`` at ``H/2^i``. Per branch a residual block

    y = ReLU(GN(conv3×3_{C→EC}(z))),   y = GN(drop(conv3×3_{EC→C}(y)) + x_i),
    y = GN(ReLU(y + z)),

  then multiscale fusion (:class:`jdeq.nn.MultiscaleFusion`) and per branch
  ReLU → 1×1 conv → GN(groups/2). The two block convs and the post-fusion conv are
  weight-normalized; weights and the per-channel dropout masks are computed once
  per forward pass (:meth:`MDEQCell.prepare`).
* **heads** — classification (HRNet style: per-branch bottlenecks, stride-2 merges
  toward the coarsest branch, 1×1 conv, global average pooling, linear) and
  segmentation (bilinear upsampling of every branch to the top resolution,
  concatenation, 1×1 conv–BN–ReLU, conv to the classes).

Initialisation as in the reference: plain convs ``N(0, 0.01²)`` (weights and
biases), BN/GN scale 1 and bias 0, and — because the reference's re-initialisation
does not reach weight-normalized convs — PyTorch's default
``U(±1/√fan_in)`` for those, with gains ``g = ‖v‖``. The classifier is PyTorch's
default Linear.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jdeq
from jdeq import (AbstractSolver, GradientMode, config, nn, require, require_choice,
                  require_positive)
from jdeq.models.registry import ModelConfig

#: N(0, 0.01²): the reference's initialisation of every plain conv (and its bias).
SMALL_NORMAL = nnx.initializers.normal(0.01)
#: PyTorch's default Conv/Linear initialisation, U(±1/√fan_in).
TORCH_DEFAULT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  """PyTorch's default bias initialisation, U(±1/√fan_in)."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@config
class MDEQConfig(ModelConfig):
  """An MDEQ model.

  Attributes:
    channels: channels of each branch (branch ``i`` at resolution ``/2^i``).
    num_classes: output classes.
    head: ``"classification"`` or ``"segmentation"``.
    in_channels: image channels.
    expansion: ``E``, the inner width of a residual block is ``E · C``.
    num_groups: GroupNorm groups of the blocks and fusion (post-fusion uses half).
    dropout: variational dropout rate in the residual blocks.
    weight_norm: weight-normalize the block convs and the post-fusion conv.
    downsample_times: stride-2 convs in the stem (0 CIFAR, 2 ImageNet/Cityscapes).
    block_gn_affine, fuse_gn_affine, post_gn_affine: learned GroupNorm affine
      parameters in the blocks, the fusion paths and after fusion.
    head_channels: bottleneck widths per branch of the classification head (each
      bottleneck outputs 4×).
    final_channels: width before the classifier.
    final_conv_kernel: kernel of the segmentation head's last conv (1 or 3).
    bn_momentum: BatchNorm running-average momentum (Flax convention: PyTorch's
      0.1 is 0.9 here).
    unrolled_steps: iterations of the unrolled "pretraining" mode.
    solver: training forward solver (budget = the reference ``F_THRES``).
    eval_solver: evaluation forward solver.
    grad: gradient mode; IFT's backward solver carries the reference ``B_THRES``.
    train_output: ``"f_z_star"``: training reads ``f(z*)``, one more application
      of the cell after the solve, as the reference's ``_forward`` does (its
      ``new_z1 = func(z1)``); ``"z_star"``: the solver's ``z*`` (see
      :class:`jdeq.nn.DEQ`).
  """
  channels: tuple[int, ...] = (24, 24)
  num_classes: int = 10
  head: str = "classification"
  in_channels: int = 3
  expansion: int = 5
  num_groups: int = 8
  dropout: float = 0.0
  weight_norm: bool = True
  downsample_times: int = 0
  block_gn_affine: bool = True
  fuse_gn_affine: bool = True
  post_gn_affine: bool = True
  head_channels: tuple[int, ...] = (8, 16)
  final_channels: int = 200
  final_conv_kernel: int = 1
  bn_momentum: float = 0.9
  unrolled_steps: int = 10
  solver: AbstractSolver = jdeq.Broyden(max_iter=18, tol=1e-3, stop_mode="rel",
                                        memory=18)
  eval_solver: AbstractSolver = jdeq.Broyden(max_iter=18, tol=1e-3, stop_mode="rel",
                                             memory=18)
  grad: GradientMode = jdeq.IFT(jdeq.Broyden(max_iter=20, tol=1e-3, stop_mode="rel",
                                             memory=20))
  train_output: str = "f_z_star"

  def __post_init__(self) -> None:
    object.__setattr__(self, "channels", tuple(self.channels))
    object.__setattr__(self, "head_channels", tuple(self.head_channels))
    require(len(self.channels) >= 1, self, "channels must name at least one branch")
    require_positive(self, num_classes=self.num_classes, in_channels=self.in_channels,
                     expansion=self.expansion, num_groups=self.num_groups,
                     final_channels=self.final_channels,
                     unrolled_steps=self.unrolled_steps)
    require(all(c > 0 for c in self.channels), self,
            f"channels must be positive, got {self.channels}")
    require_choice(self, "head", self.head, ("classification", "segmentation"))
    post_groups = max(self.num_groups // 2, 1)
    for c in self.channels:
      require(c % self.num_groups == 0 and (self.expansion * c) % self.num_groups == 0
              and c % post_groups == 0, self,
              f"branch width {c} (and {self.expansion}×{c}) must be divisible by "
              f"num_groups={self.num_groups}")
    require(0.0 <= self.dropout < 1.0, self,
            f"dropout must be in [0, 1), got {self.dropout!r}")
    require(isinstance(self.downsample_times, int) and self.downsample_times >= 0, self,
            f"downsample_times must be an integer >= 0, got {self.downsample_times!r}")
    if self.head == "classification":
      require(len(self.head_channels) == len(self.channels), self,
              f"head_channels {self.head_channels} needs one width per branch "
              f"{self.channels}")
    require_choice(self, "final_conv_kernel", self.final_conv_kernel, (1, 3))
    require_choice(self, "train_output", self.train_output, nn.TRAIN_OUTPUTS)
    require(0.0 <= self.bn_momentum < 1.0, self,
            f"bn_momentum must be in [0, 1), got {self.bn_momentum!r}")

  @property
  def num_branches(self) -> int:
    return len(self.channels)

  def build(self, *, rngs: nnx.Rngs) -> "MDEQ":
    return MDEQ(self, rngs=rngs)


def _conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
          bias: bool = False, rngs: nnx.Rngs, kernel_init=SMALL_NORMAL) -> nnx.Conv:
  """A conv with PyTorch's symmetric padding ``kernel // 2`` and the reference init."""
  pad = kernel // 2
  return nn.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                  padding=((pad, pad), (pad, pad)), use_bias=bias,
                  kernel_init=kernel_init, bias_init=SMALL_NORMAL, rngs=rngs)


def _batch_norm(features: int, cfg: MDEQConfig, rngs: nnx.Rngs, *,
                affine: bool = True) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=cfg.bn_momentum, epsilon=nn.NORM_EPSILON,
                       use_scale=affine, use_bias=affine, rngs=rngs)


def _cell_conv(in_features: int, out_features: int, kernel: int, cfg: MDEQConfig,
               rngs: nnx.Rngs) -> nnx.Module:
  """A conv of the equilibrium cell, weight-normalized when the config says so."""
  if not cfg.weight_norm:
    return _conv(in_features, out_features, kernel, rngs=rngs)
  return nn.WeightNorm(_conv(in_features, out_features, kernel, rngs=rngs,
                             kernel_init=TORCH_DEFAULT))


class MDEQStem(nnx.Module):
  """Image → injection ``x`` of the highest-resolution branch."""

  def __init__(self, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    width = cfg.channels[0]
    num_convs = max(2, cfg.downsample_times)
    self.convs = nnx.List([
        _conv(cfg.in_channels if k == 0 else width, width, 3,
              stride=2 if k < cfg.downsample_times else 1, rngs=rngs)
        for k in range(num_convs)])
    self.norms = nnx.List([_batch_norm(width, cfg, rngs) for _ in range(num_convs)])
    if cfg.downsample_times > 0 or cfg.num_branches > 2:
      self.injection_conv = _conv(width, width, 1, rngs=rngs)
      self.injection_norm = _batch_norm(width, cfg, rngs)
    else:
      self.injection_conv = self.injection_norm = None

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x), use_running_average=not train))
    if self.injection_conv is not None:
      x = jax.nn.relu(self.injection_norm(self.injection_conv(x),
                                          use_running_average=not train))
    return x


class ResidualBlock(nnx.Module):
  """The per-branch block of the cell (see the module docstring)."""

  def __init__(self, channels: int, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    inner = cfg.expansion * channels
    affine = cfg.block_gn_affine
    self.channels = channels
    self.dropout = cfg.dropout
    self.conv1 = _cell_conv(channels, inner, 3, cfg, rngs)
    self.norm1 = nn.group_norm(inner, cfg.num_groups, affine=affine, rngs=rngs)
    self.conv2 = _cell_conv(inner, channels, 3, cfg, rngs)
    self.norm2 = nn.group_norm(channels, cfg.num_groups, affine=affine, rngs=rngs)
    self.norm3 = nn.group_norm(channels, cfg.num_groups, affine=affine, rngs=rngs)

  def prepare(self, batch_size: int, dtype, *, train: bool,
              key: Optional[jax.Array]) -> dict:
    mask = None
    if train and self.dropout > 0:
      mask = nn.variational_dropout_mask(key, batch_size, self.channels, self.dropout,
                                         dtype=dtype)
    return dict(conv1=nn.effective_weight(self.conv1, train=train),
                conv2=nn.effective_weight(self.conv2, train=train), mask=mask)

  def __call__(self, z: jax.Array, injection: Optional[jax.Array],
               prepared: dict) -> jax.Array:
    y = jax.nn.relu(self.norm1(nn.apply_layer(self.conv1, z, prepared["conv1"])))
    y = nn.apply_layer(self.conv2, y, prepared["conv2"])
    if prepared["mask"] is not None:
      y = y * prepared["mask"]
    if injection is not None:
      y = y + injection
    y = self.norm2(y)
    return self.norm3(jax.nn.relu(y + z))


class MDEQCell(nn.EquilibriumCell):
  """The MDEQ map ``f(z, x)`` on the multi-resolution state ``z = [z_0, …, z_{n−1}]``."""

  def __init__(self, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    self.channels = cfg.channels
    self.blocks = nnx.List([ResidualBlock(c, cfg, rngs=rngs) for c in cfg.channels])
    self.fusion = (nn.MultiscaleFusion(cfg.channels, num_groups=cfg.num_groups,
                                       affine=cfg.fuse_gn_affine,
                                       kernel_init=SMALL_NORMAL, rngs=rngs)
                   if cfg.num_branches > 1 else None)
    self.post_convs = nnx.List([_cell_conv(c, c, 1, cfg, rngs) for c in cfg.channels])
    self.post_norms = nnx.List([
        nn.group_norm(c, max(cfg.num_groups // 2, 1), affine=cfg.post_gn_affine,
                      rngs=rngs) for c in cfg.channels])

  def initial_state(self, injection: jax.Array) -> list[jax.Array]:
    batch, height, width, _ = injection.shape
    return [jnp.zeros((batch, height >> i, width >> i, c), injection.dtype)
            for i, c in enumerate(self.channels)]

  def prepare(self, injection: jax.Array, *, train: bool,
              key: Optional[jax.Array]) -> dict:
    needs_key = train and any(block.dropout > 0 for block in self.blocks)
    if needs_key and key is None:
      raise ValueError("MDEQCell: training with dropout needs a dropout key")
    keys = (list(jax.random.split(key, len(self.blocks))) if needs_key
            else [None] * len(self.blocks))
    batch = injection.shape[0]
    return dict(
        blocks=[block.prepare(batch, injection.dtype, train=train, key=k)
                for block, k in zip(self.blocks, keys)],
        post=[nn.effective_weight(conv, train=train) for conv in self.post_convs])

  def __call__(self, z: Sequence[jax.Array], injection: jax.Array,
               prepared: dict) -> list[jax.Array]:
    # Only the highest resolution is driven by the input; the others get zero.
    y = [block(z_i, injection if i == 0 else None, p)
         for i, (block, z_i, p) in enumerate(zip(self.blocks, z, prepared["blocks"]))]
    if self.fusion is not None:
      y = self.fusion(y)
    return [norm(nn.apply_layer(conv, jax.nn.relu(y_i), w))
            for conv, norm, y_i, w in zip(self.post_convs, self.post_norms, y,
                                          prepared["post"])]


class Bottleneck(nnx.Module):
  """1×1 → 3×3 → 1×1 (×4) bottleneck with BN (no affine) and a projected shortcut."""

  expansion = 4

  def __init__(self, in_channels: int, planes: int, cfg: MDEQConfig, *,
               rngs: nnx.Rngs):
    out = planes * self.expansion
    self.conv1 = _conv(in_channels, planes, 1, rngs=rngs)
    self.norm1 = _batch_norm(planes, cfg, rngs, affine=False)
    self.conv2 = _conv(planes, planes, 3, rngs=rngs)
    self.norm2 = _batch_norm(planes, cfg, rngs, affine=False)
    self.conv3 = _conv(planes, out, 1, rngs=rngs)
    self.norm3 = _batch_norm(out, cfg, rngs, affine=False)
    if in_channels != out:
      self.shortcut_conv = _conv(in_channels, out, 1, rngs=rngs)
      self.shortcut_norm = _batch_norm(out, cfg, rngs)
    else:
      self.shortcut_conv = self.shortcut_norm = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    frozen = not train
    y = jax.nn.relu(self.norm1(self.conv1(x), use_running_average=frozen))
    y = jax.nn.relu(self.norm2(self.conv2(y), use_running_average=frozen))
    y = self.norm3(self.conv3(y), use_running_average=frozen)
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = self.shortcut_norm(self.shortcut_conv(x), use_running_average=frozen)
    return jax.nn.relu(y + shortcut)


class ClassificationHead(nnx.Module):
  """Equilibrium branches → logits ``(B, num_classes)`` (HRNet-style head)."""

  def __init__(self, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    widths = [h * Bottleneck.expansion for h in cfg.head_channels]
    self.increase = nnx.List([Bottleneck(c, h, cfg, rngs=rngs)
                              for c, h in zip(cfg.channels, cfg.head_channels)])
    self.merge_convs = nnx.List([_conv(widths[i], widths[i + 1], 3, stride=2,
                                       bias=True, rngs=rngs)
                                 for i in range(len(widths) - 1)])
    self.merge_norms = nnx.List([_batch_norm(widths[i + 1], cfg, rngs)
                                 for i in range(len(widths) - 1)])
    self.final_conv = _conv(widths[-1], cfg.final_channels, 1, bias=True, rngs=rngs)
    self.final_norm = _batch_norm(cfg.final_channels, cfg, rngs)
    self.classifier = nnx.Linear(cfg.final_channels, cfg.num_classes,
                                 kernel_init=TORCH_DEFAULT,
                                 bias_init=torch_default_bias(cfg.final_channels),
                                 rngs=rngs)

  def __call__(self, z: Sequence[jax.Array], *, train: bool,
               output_size: tuple[int, int]) -> jax.Array:
    del output_size
    frozen = not train
    y = self.increase[0](z[0], train=train)
    for i, (conv, norm) in enumerate(zip(self.merge_convs, self.merge_norms)):
      y = self.increase[i + 1](z[i + 1], train=train) + jax.nn.relu(
          norm(conv(y), use_running_average=frozen))
    y = jax.nn.relu(self.final_norm(self.final_conv(y), use_running_average=frozen))
    return self.classifier(jnp.mean(y, axis=(1, 2)))


class SegmentationHead(nnx.Module):
  """Equilibrium branches → per-pixel logits ``(B, H, W, num_classes)``.

  The logits are computed at the top branch's resolution and resized bilinearly to
  the input image (the reference does the latter in its loss).
  """

  def __init__(self, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    total = sum(cfg.channels)
    self.mix_conv = _conv(total, total, 1, bias=True, rngs=rngs)
    self.mix_norm = _batch_norm(total, cfg, rngs)
    self.classifier = _conv(total, cfg.num_classes, cfg.final_conv_kernel, bias=True,
                            rngs=rngs)

  def __call__(self, z: Sequence[jax.Array], *, train: bool,
               output_size: tuple[int, int]) -> jax.Array:
    height, width = z[0].shape[1:3]
    y = jnp.concatenate([z[0]] + [nn.bilinear_resize(z_i, height, width)
                                  for z_i in z[1:]], axis=-1)
    y = jax.nn.relu(self.mix_norm(self.mix_conv(y), use_running_average=not train))
    return nn.bilinear_resize(self.classifier(y), *output_size)


class MDEQ(nn.DEQNetwork):
  """A complete MDEQ: ``stem`` → ``deq`` (an :class:`jdeq.nn.DEQ` around
  :class:`MDEQCell`) → ``head``, called as the model contract says
  (:class:`jdeq.nn.EquilibriumModel`) on ``(B, H, W, C)`` float images.

  Randomness (dropout masks, Hutchinson probes) is drawn from the model's own
  ``nnx.Rngs`` streams ``"dropout"`` and ``"jacobian"`` (falling back to
  ``"default"``), so it is part of the model state.
  """

  def __init__(self, cfg: MDEQConfig, *, rngs: nnx.Rngs):
    stem = MDEQStem(cfg, rngs=rngs)
    cell = MDEQCell(cfg, rngs=rngs)
    head = (ClassificationHead(cfg, rngs=rngs) if cfg.head == "classification"
            else SegmentationHead(cfg, rngs=rngs))
    super().__init__(cfg, stem, cell, head, rngs=rngs, cell_dropout=cfg.dropout > 0)

  def check_input(self, images: jax.Array) -> None:
    """NHWC images whose height and width every branch can halve down to."""
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"MDEQ expects NHWC images with {cfg.in_channels} channels, "
                       f"got shape {images.shape}")
    factor = 2 ** (cfg.downsample_times + cfg.num_branches - 1)
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"MDEQ with {cfg.num_branches} branches and "
                       f"{cfg.downsample_times} stem downsamplings needs image height and "
                       f"width divisible by {factor}, got {images.shape[1:3]}")

  def readout(self, z_star: Sequence[jax.Array], images: jax.Array, *,
              train: bool) -> jax.Array:
    """Logits ``(B, K)`` (classification) or ``(B, H, W, K)`` at the image size."""
    return self.head(z_star, train=train, output_size=images.shape[1:3])

"""MDEQ-Tiny (CIFAR-10) in PyTorch with TorchDEQ's layers, for workload W3.

The same network as jdeq's ``models.create("mdeq_cifar_tiny")`` (see
``jdeq/models/mdeq.py`` and the MDEQ paper, Bai, Koltun & Kolter 2020), written with
PyTorch modules and TorchDEQ's weight normalization (``torchdeq.norm.apply_norm``)
and variational dropout (``torchdeq.dropout.VariationalDropout2d``), both reset once
per training step by ``torchdeq.reset_deq``. Tensors are NCHW.

* stem: twice conv3×3 (no bias) – BatchNorm – ReLU, 32×32 kept;
* cell, on the state ``[z0 (24×32×32), z1 (24×16×16)]`` with the stem output ``u``
  injected into branch 0: per branch ``y = ReLU(GN(conv3×3_{24→120}(z)))``,
  ``y = GN(drop(conv3×3_{120→24}(y)) + u)``, ``y = GN(ReLU(y + z))`` (8 groups);
  fusion (branch 1 → 0: conv1×1, GN, nearest ×2; branch 0 → 1: stride-2 conv3×3,
  GN); per branch ReLU – conv1×1 – GN(4 groups, no affine). The block convs and the
  post-fusion convs are weight-normalized;
* head: per branch a bottleneck (1×1, 3×3, 1×1 to 4× of 8 / 16 channels, BatchNorm
  without affine, projected shortcut), a stride-2 conv3×3 merge, conv1×1 to 200,
  global average pooling, a linear classifier.

Initialization follows the same scheme as jdeq's: plain convs (weights and biases)
``N(0, 0.01²)``, normalization scales 1 and biases 0, weight-normalized convs and the
classifier PyTorch's default, weight-norm gains ``‖v‖``. The parameter count is
:data:`experiments.bench.workloads.W3_PARAMS`, checked by the benchmark on both sides.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchdeq.dropout import VariationalDropout2d
from torchdeq.norm import apply_norm

from experiments.bench import workloads

CHANNELS = (24, 24)
EXPANSION = 5
GROUPS = 8
DROPOUT = 0.25
HEAD_CHANNELS = (8, 16)
FINAL_CHANNELS = 200
BN_MOMENTUM = 0.1  # PyTorch convention; jdeq's Flax BatchNorm uses 0.9 for the same


def _plain_conv(c_in: int, c_out: int, kernel: int, *, stride: int = 1,
                bias: bool = False) -> nn.Conv2d:
  """A conv with ``kernel // 2`` padding and the MDEQ init ``N(0, 0.01²)``."""
  conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)
  nn.init.normal_(conv.weight, std=0.01)
  if bias:
    nn.init.normal_(conv.bias, std=0.01)
  return conv


def _normed_conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
  """A bias-free, weight-normalized cell conv (PyTorch's default init for ``v``)."""
  conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
  apply_norm(conv, "weight_norm")  # gain g = ‖v‖ per output channel
  return conv


class ResidualBlock(nn.Module):
  """The per-branch block of the cell (see the module docstring)."""

  def __init__(self, channels: int):
    super().__init__()
    inner = EXPANSION * channels
    self.conv1 = _normed_conv(channels, inner, 3)
    self.norm1 = nn.GroupNorm(GROUPS, inner)
    self.conv2 = _normed_conv(inner, channels, 3)
    self.drop = VariationalDropout2d(DROPOUT, token_first=False)
    self.norm2 = nn.GroupNorm(GROUPS, channels)
    self.norm3 = nn.GroupNorm(GROUPS, channels)

  def forward(self, z, injection=None):
    y = F.relu(self.norm1(self.conv1(z)))
    y = self.drop(self.conv2(y))
    if injection is not None:
      y = y + injection
    y = self.norm2(y)
    return self.norm3(F.relu(y + z))


class Cell(nn.Module):
  """The MDEQ map on the two-branch state."""

  def __init__(self):
    super().__init__()
    c0, c1 = CHANNELS
    self.blocks = nn.ModuleList([ResidualBlock(c) for c in CHANNELS])
    # Fusion into branch 0 from the coarser branch 1, and into branch 1 from branch 0.
    self.up = nn.Sequential(_plain_conv(c1, c0, 1), nn.GroupNorm(GROUPS, c0),
                            nn.Upsample(scale_factor=2, mode="nearest"))
    self.down = nn.Sequential(_plain_conv(c0, c1, 3, stride=2), nn.GroupNorm(GROUPS, c1))
    self.post_convs = nn.ModuleList([_normed_conv(c, c, 1) for c in CHANNELS])
    self.post_norms = nn.ModuleList([nn.GroupNorm(GROUPS // 2, c, affine=False)
                                     for c in CHANNELS])

  def forward(self, z, injection):
    y0 = self.blocks[0](z[0], injection)
    y1 = self.blocks[1](z[1])
    fused = (y0 + self.up(y1), y1 + self.down(y0))
    return [norm(conv(F.relu(y))) for conv, norm, y in
            zip(self.post_convs, self.post_norms, fused)]


class Bottleneck(nn.Module):
  """1×1 → 3×3 → 1×1 (×4) with non-affine BatchNorm and a projected shortcut."""

  def __init__(self, c_in: int, planes: int):
    super().__init__()
    out = 4 * planes
    self.conv1, self.conv2 = _plain_conv(c_in, planes, 1), _plain_conv(planes, planes, 3)
    self.conv3 = _plain_conv(planes, out, 1)
    self.norms = nn.ModuleList([
        nn.BatchNorm2d(c, momentum=BN_MOMENTUM, affine=False) for c in (planes, planes, out)])
    self.shortcut = nn.Sequential(_plain_conv(c_in, out, 1),
                                  nn.BatchNorm2d(out, momentum=BN_MOMENTUM))

  def forward(self, x):
    y = F.relu(self.norms[0](self.conv1(x)))
    y = F.relu(self.norms[1](self.conv2(y)))
    y = self.norms[2](self.conv3(y))
    return F.relu(y + self.shortcut(x))


class Head(nn.Module):
  """Equilibrium branches → logits (HRNet-style classification head)."""

  def __init__(self):
    super().__init__()
    widths = [4 * h for h in HEAD_CHANNELS]
    self.increase = nn.ModuleList([Bottleneck(c, h)
                                   for c, h in zip(CHANNELS, HEAD_CHANNELS)])
    self.merge = nn.Sequential(_plain_conv(widths[0], widths[1], 3, stride=2, bias=True),
                               nn.BatchNorm2d(widths[1], momentum=BN_MOMENTUM), nn.ReLU())
    self.final = nn.Sequential(_plain_conv(widths[1], FINAL_CHANNELS, 1, bias=True),
                               nn.BatchNorm2d(FINAL_CHANNELS, momentum=BN_MOMENTUM),
                               nn.ReLU())
    self.classifier = nn.Linear(FINAL_CHANNELS, workloads.NUM_CLASSES)

  def forward(self, z):
    y = self.increase[1](z[1]) + self.merge(self.increase[0](z[0]))
    return self.classifier(self.final(y).mean(dim=(2, 3)))


class MDEQTiny(nn.Module):
  """Stem, cell and head, with the interface of the benchmark's other cells."""

  def __init__(self):
    super().__init__()
    c0 = CHANNELS[0]
    self.stem = nn.Sequential(
        _plain_conv(workloads.W3_IN_CHANNELS, c0, 3),
        nn.BatchNorm2d(c0, momentum=BN_MOMENTUM), nn.ReLU(),
        _plain_conv(c0, c0, 3), nn.BatchNorm2d(c0, momentum=BN_MOMENTUM), nn.ReLU())
    self.cell = Cell()
    self.head = Head()

  def inject(self, x):
    return self.stem(x)

  def map(self, z, u):
    return self.cell(z, u)

  def initial_state(self, u):
    batch, _, height, width = u.shape
    return [u.new_zeros((batch, c, height >> i, width >> i))
            for i, c in enumerate(CHANNELS)]

  def logits(self, z):
    return self.head(z)


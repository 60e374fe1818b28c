r"""OptEq and MOptEqs cells: linear-kernel branches, coupled across resolutions.

Branch ``i`` (``i = 0`` finest) holds ``z_i`` at ``1/2^i`` of the input features'
resolution, receives the injection ``U_i x_i + b_i`` (``U_i`` a weight-normalized 3×3
convolution) from ``x_i`` = ``x`` average-pooled
``i`` times, and mixes its state through the circular convolution ``W_i`` with
``‖W_i‖₂ < max_norm``. Neighbouring branches are coupled through
``(λ/2)‖z_{i+1} − D_i z_i‖²`` (see :mod:`jdeq.models.optimization.branches`), so the cell

  z_i ← ReLU(W_iᵀW_i z_i + U_i x_i + b_i
             + λ D_iᵀ(z_{i+1} − D_i z_i) − λ (z_i − D_{i−1} z_{i−1}))

is one proximal-gradient step on the strongly convex objective

  G(z) = Σ_i [ι_{z_i ≥ 0} + ½‖z_i‖² − ½‖W_i z_i‖² − ⟨U_i x_i + b_i, z_i⟩]
         + (λ/2) Σ_i ‖z_{i+1} − D_i z_i‖².
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from jdeq.nn import Conv, WeightNorm
from jdeq.models.optimization import operators as ops_lib
from jdeq.models.optimization.branches import (LinearKernelBranch, MultiBranchCell,
                                               MultiBranchObjective)


class MOptEqsCell(MultiBranchCell):
  """The multi-branch linear-kernel cell of MOptEqs (one branch: OptEq).

  Args:
    in_channels: channels of the input features ``x``.
    channels: channels of each branch, finest first (the small model: ``(32, 32, 32)``).
    coupling: ``λ``, the weight of the cross-resolution consistency term.
    max_norm: bound ``c < 1`` on ``‖W_i‖₂`` (strong convexity modulus ``1 − c²``).
    rngs: parameter initialization.
  """

  def __init__(self, in_channels: int, channels: Sequence[int], *,
               coupling: float = 0.01, max_norm: float = 0.9, rngs: nnx.Rngs):
    channels = tuple(channels)
    if not channels or min(channels) < 1:
      raise ValueError(f"MOptEqsCell: channels must be a non-empty tuple of positive "
                       f"integers, got {channels}")
    if not 0 < max_norm < 1:
      raise ValueError(f"MOptEqsCell: max_norm must be in (0, 1) for a convex "
                       f"objective, got {max_norm}")
    if coupling < 0:
      raise ValueError(f"MOptEqsCell: coupling must be >= 0, got {coupling}")
    self.channels = channels
    self.mixing = nnx.List([
        ops_lib.SpectralConv(c, c, max_norm=max_norm, init_norm=max_norm / 2,
                             rngs=rngs) for c in channels])
    self.injection = nnx.List([
        WeightNorm(Conv(in_channels, c, (3, 3), padding="SAME", rngs=rngs))
        for c in channels])
    self.down_maps = nnx.List([
        ops_lib.SpectralChannelMap(c_fine, c_coarse, rngs=rngs)
        for c_fine, c_coarse in zip(channels[:-1], channels[1:])])
    self.objective_spec = MultiBranchObjective(
        branches=(LinearKernelBranch(),) * len(channels), coupling=float(coupling))

  def branch_operators(self, x: jax.Array) -> list[dict]:
    branches = []
    for level, (mixing, injection) in enumerate(zip(self.mixing, self.injection)):
      x_level = ops_lib.resample(x, level)
      kernel, symbol = mixing.normalized(x_level.shape[1:3])
      branches.append({"w": kernel, "w_gram": ops_lib.spectral_gram(symbol),
                       "injection": injection(x_level)})
    return branches


def OptEqCell(in_channels: int, channels: int, *, max_norm: float = 0.9,
              rngs: nnx.Rngs) -> MOptEqsCell:
  """OptEq's single-branch cell ``z = ReLU(WᵀWz + Ux + b)`` (state: a 1-tuple)."""
  return MOptEqsCell(in_channels, (channels,), coupling=0.0, max_norm=max_norm,
                     rngs=rngs)

r"""The GEQ cell: Gaussian-kernel branches at several input scales.

Branch ``i`` compares its input ``x_i`` (the features average-pooled ``i`` times) with
the reconstruction ``W_h z_i`` position by position, through a Gaussian kernel:

  G^{(i)}(z) = ι_{z ≥ 0} + ½‖z‖² − ½‖W z‖² − ⟨b, z⟩ + (1/2γ) Σ_p (1 − exp(−γ‖x_p − (W_h z)_p‖²)),

with the update ``z ← ReLU(WᵀWz + b + W_hᵀ[w ⊙ (x − W_h z)])``, ``w_p = exp(−γ d_p)``.

Kernel width (the papers' ``γ = 0.2 / M``; our documented choices): ``M`` is taken
**per sample** (the solver treats samples independently, so a sample's equilibrium must
not depend on the rest of the batch) and **at the start point** ``z0 = 0``, i.e.
``M = min_p ‖x_p‖²``, and ``γ`` is **held fixed during the solve** (it depends on
``x`` only, not on ``z``), so each solve minimizes one fixed objective. ``γ`` stays
differentiable in ``x`` (hence in the stem's parameters), so model gradients are
exact gradients of the loss. ``M`` is floored at
``1e-2 · mean_p ‖x_p‖²`` (so ``γ · mean_p d_p ≤ 20``): one near-zero input position
cannot make ``γ`` explode and the kernel vanish everywhere else.

Convexity: the Gaussian term's curvature along ``W_h`` is at least
``min_t e^{−t}(1 − 2t) = −2e^{−3/2}`` for every ``γ``, so ``G`` is convex when
``c_w² + 2e^{−3/2} c_h² < 1`` (``c_w, c_h`` the norm bounds of ``W`` and ``W_h``) and its
gradient is ``(1 + c_h²)``-Lipschitz, so the unit step decreases ``G`` when ``c_h < 1``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq.models.optimization import operators as ops_lib
from jdeq.models.optimization.branches import (GaussianKernelBranch, MultiBranchCell,
                                               MultiBranchObjective)

# min over t ≥ 0 of e^{−t}(1 − 2t), the most negative curvature of the kernel term.
KERNEL_CURVATURE_FLOOR = -2 * math.exp(-1.5)
# M is floored at this fraction of the mean patch distance.
MIN_DISTANCE_FLOOR = 1e-2


def is_convex(max_norm: float, hidden_max_norm: float) -> bool:
  """Whether ``‖W‖ < max_norm``, ``‖W_h‖ < hidden_max_norm`` certify convexity and
  descent of the unit proximal-gradient step."""
  return (max_norm ** 2 + abs(KERNEL_CURVATURE_FLOOR) * hidden_max_norm ** 2 <= 1
          and hidden_max_norm <= 1)


def kernel_width(x: jax.Array, gamma_scale: float = 0.2) -> jax.Array:
  """``γ = gamma_scale / M`` per sample, ``M = min_p ‖x_p‖²`` (distance at ``z = 0``)."""
  distances = jnp.sum(jnp.square(x), axis=-1).reshape(x.shape[0], -1)
  floor = MIN_DISTANCE_FLOOR * jnp.mean(distances, axis=1) + jnp.finfo(x.dtype).tiny
  return gamma_scale / jnp.maximum(distances.min(1), floor)


class GEQCell(MultiBranchCell):
  """Parallel GEQ branches, one per input scale, finest first.

  Args:
    in_channels: channels ``C_x`` of the input features.
    channels: channels of each branch.
    max_norm: bound ``c_w`` on ``‖W‖₂``.
    hidden_max_norm: bound ``c_h`` on ``‖W_h‖₂``.
    gamma_scale: the ``0.2`` of ``γ = 0.2 / M``.
    gamma: a fixed kernel width instead of the ``0.2 / M`` rule (ablations, the
      ``γ → 0`` linear-kernel limit).
    coupling: optional ``λ`` coupling neighbouring branches as in MOptEqs (GEQ's
      branches meet only in the fusion: default 0).
    rngs: parameter initialization.
  """

  def __init__(self, in_channels: int, channels: Sequence[int], *,
               max_norm: float = 0.8, hidden_max_norm: float = 0.8,
               gamma_scale: float = 0.2, gamma: Optional[float] = None,
               coupling: float = 0.0, rngs: nnx.Rngs):
    channels = tuple(channels)
    if not channels or min(channels) < 1:
      raise ValueError(f"GEQCell: channels must be a non-empty tuple of positive "
                       f"integers, got {channels}")
    if not (max_norm > 0 and hidden_max_norm > 0
            and is_convex(max_norm, hidden_max_norm)):
      raise ValueError(
          f"GEQCell: max_norm={max_norm}, hidden_max_norm={hidden_max_norm} do not "
          f"certify a convex objective: need max_norm² + {abs(KERNEL_CURVATURE_FLOOR):.3f}"
          f"·hidden_max_norm² <= 1 and hidden_max_norm <= 1")
    if gamma_scale <= 0 or (gamma is not None and gamma <= 0):
      raise ValueError(f"GEQCell: gamma_scale and gamma must be > 0, got "
                       f"gamma_scale={gamma_scale}, gamma={gamma}")
    self.channels = channels
    self.gamma_scale = gamma_scale
    self.fixed_gamma = gamma
    self.mixing = nnx.List([
        ops_lib.SpectralConv(c, c, max_norm=max_norm, init_norm=max_norm / 2,
                             rngs=rngs) for c in channels])
    self.reconstruction = nnx.List([
        ops_lib.SpectralConv(c, in_channels, max_norm=hidden_max_norm,
                             init_norm=hidden_max_norm / 2, rngs=rngs)
        for c in channels])
    self.bias = nnx.List([nnx.Param(jnp.zeros((c,), jnp.float32)) for c in channels])
    self.down_maps = nnx.List([
        ops_lib.SpectralChannelMap(c_fine, c_coarse, rngs=rngs)
        for c_fine, c_coarse in zip(channels[:-1], channels[1:])] if coupling else [])
    self.objective_spec = MultiBranchObjective(
        branches=(GaussianKernelBranch(),) * len(channels), coupling=float(coupling))

  def branch_operators(self, x: jax.Array) -> list[dict]:
    branches = []
    for level, (mixing, reconstruction, bias) in enumerate(
        zip(self.mixing, self.reconstruction, self.bias)):
      x_level = ops_lib.resample(x, level)
      grid = x_level.shape[1:3]
      if self.fixed_gamma is None:
        gamma = kernel_width(x_level, self.gamma_scale)
      else:
        gamma = jnp.full((x.shape[0],), self.fixed_gamma, x.dtype)
      w, w_symbol = mixing.normalized(grid)
      w_h, w_h_symbol = reconstruction.normalized(grid)
      branches.append({"w": w, "w_gram": ops_lib.spectral_gram(w_symbol),
                       "w_h": w_h, "w_h_symbol": w_h_symbol,
                       "x": x_level, "bias": bias[...].astype(x.dtype),
                       "gamma": gamma})
    return branches

r"""The per-branch terms of the hidden objectives and their coupling.

Linear kernel (OptEq, the MOptEqs branches), for one branch with state ``z``:

  G_s(z) = ½‖z‖² − ½‖Wz‖² − ⟨Ux + b, z⟩,
  ∇G_s(z) = z − WᵀWz − (Ux + b),   T(z) = ReLU(WᵀWz + Ux + b).

Gaussian kernel (GEQ), with ``d_p(z) = ‖x_p − (W_h z)_p‖²`` at each spatial position
``p`` and a kernel width ``γ > 0`` held fixed during a solve:

  G_s(z) = ½‖z‖² − ½‖Wz‖² − ⟨b, z⟩ + (1/2γ) Σ_p (1 − exp(−γ d_p(z))),
  ∇G_s(z) = z − WᵀWz − b − W_hᵀ[w ⊙ (x − W_h z)],   w_p = exp(−γ d_p(z)),

which tends to the linear-kernel branch with ``U = W_hᵀ`` (plus the convex
reconstruction term ``½‖x − W_h z‖²``) as ``γ → 0``.

Coupling of neighbouring branches (MOptEqs), ``D_i`` = 2×2 average pooling followed by
a channel map ``P_i``:

  C(z) = (λ/2) Σ_i ‖z_{i+1} − D_i z_i‖²,
  ∂C/∂z_i ∋ −λ D_iᵀ(z_{i+1} − D_i z_i),   ∂C/∂z_{i+1} ∋ λ (z_{i+1} − D_i z_i),

so the down-sampling map ``D_i`` carries a branch to the next coarser one and its
adjoint ``D_iᵀ`` (nearest upsampling) carries information back. See
``docs/optimization_cells.md`` for the derivation and the convexity conditions.

Two implementations of the same operators: the values ``G_s`` use the spatial
circular convolutions (the definition), the gradients — hence the cell map, which
runs inside the solver loops — apply ``W``, ``WᵀW``, ``W_h`` and ``W_hᵀ`` through
the real FFT (:func:`~jdeq.models.optimization.operators.spectral_product`),
where a circular convolution is one small matrix per frequency. The tests check the
closed-form gradients against autodiff of the values, so they also check that the
two implementations agree.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jdeq import per_sample_dot, per_sample_sum
from jdeq.models.optimization import operators as ops_lib
from jdeq.models.optimization.objective import Objective, OptimizationCell

Operators = Mapping[str, Any]


def _quadratic_value(z: jax.Array, w: jax.Array) -> jax.Array:
  """``½‖z‖² − ½‖Wz‖²`` per sample (spatial), shared by both kernels."""
  wz = ops_lib.circular_conv(z, w)
  return 0.5 * per_sample_dot(z, z) - 0.5 * per_sample_dot(wz, wz)


@dataclasses.dataclass(frozen=True)
class LinearKernelBranch:
  """OptEq's branch: operators ``{"w": W's kernel, "w_gram": the real-FFT symbol of
  WᵀW (:func:`~jdeq.models.optimization.operators.spectral_gram`), "injection": Ux + b}``.
  """

  def value(self, z: jax.Array, operators: Operators) -> jax.Array:
    return (_quadratic_value(z, operators["w"])
            - per_sample_dot(operators["injection"], z))

  def gradient(self, z: jax.Array, operators: Operators) -> jax.Array:
    mixed = ops_lib.from_spectrum(ops_lib.spectral_product(
        ops_lib.to_spectrum(z), operators["w_gram"]), z.shape[1:3])  # WᵀWz
    return z - mixed - operators["injection"]


def _per_position(values: jax.Array) -> jax.Array:
  """Broadcasts a per-sample ``(B,)`` array against NHWC maps."""
  return values[:, None, None, None]


@dataclasses.dataclass(frozen=True)
class GaussianKernelBranch:
  """GEQ's branch: operators ``{"w", "w_gram", "w_h", "w_h_symbol", "x", "bias",
  "gamma"}``.

  ``w_h`` maps the state (``C`` channels) to the input space (``C_x`` channels) and
  ``w_h_symbol`` is its real-FFT symbol, ``w``/``w_gram`` as in
  :class:`LinearKernelBranch`, ``x`` is the branch input ``(B, H, W, C_x)``,
  ``gamma`` the per-sample width ``(B,)``.
  """

  def distances(self, z: jax.Array, operators: Operators) -> jax.Array:
    """``d_p = ‖x_p − (W_h z)_p‖²``, shape ``(B, H, W, 1)``."""
    residual = operators["x"] - ops_lib.circular_conv(z, operators["w_h"])
    return jnp.sum(jnp.square(residual), axis=-1, keepdims=True)

  def value(self, z: jax.Array, operators: Operators) -> jax.Array:
    gamma = _per_position(operators["gamma"])
    # (1 − e^{−γd}) / 2γ, computed with expm1 so the γ → 0 limit keeps its digits.
    kernel = -jnp.expm1(-gamma * self.distances(z, operators)) / (2 * gamma)
    return (_quadratic_value(z, operators["w"])
            - per_sample_dot(jnp.broadcast_to(operators["bias"], z.shape), z)
            + per_sample_sum(kernel))

  def gradient(self, z: jax.Array, operators: Operators) -> jax.Array:
    grid = z.shape[1:3]
    z_hat = ops_lib.to_spectrum(z)  # shared by WᵀWz and W_h z
    residual = operators["x"] - ops_lib.from_spectrum(
        ops_lib.spectral_product(z_hat, operators["w_h_symbol"]), grid)
    distances = jnp.sum(jnp.square(residual), axis=-1, keepdims=True)
    weights = jnp.exp(-_per_position(operators["gamma"]) * distances)
    # WᵀWz + W_hᵀ[w ⊙ (x − W_h z)], summed in the frequency domain: one inverse FFT.
    mixed = (ops_lib.spectral_product(z_hat, operators["w_gram"])
             + ops_lib.spectral_product(ops_lib.to_spectrum(weights * residual),
                                        operators["w_h_symbol"], adjoint=True))
    return z - ops_lib.from_spectrum(mixed, grid) - operators["bias"]


def down(z: jax.Array, matrix: jax.Array) -> jax.Array:
  """``D z``: 2×2 average pooling, then the channel map ``P``."""
  return ops_lib.avg_pool2(z) @ matrix.astype(z.dtype)


def down_transpose(y: jax.Array, matrix: jax.Array) -> jax.Array:
  """``Dᵀ y``: the channel map ``Pᵀ``, then nearest upsampling ×2 divided by 4."""
  return ops_lib.avg_pool2_transpose(y @ matrix.T.astype(y.dtype))


@dataclasses.dataclass(frozen=True)
class MultiBranchObjective(Objective):
  """``Σ_i G_s^{(i)}(z_i) + (λ/2) Σ_i ‖z_{i+1} − D_i z_i‖²`` over a tuple of branches.

  Operators: ``{"branches": (per-branch operators, ...), "down": (P_0, ..., P_{n−2})}``.

  Attributes:
    branches: the per-branch terms (:class:`LinearKernelBranch`,
      :class:`GaussianKernelBranch`), finest resolution first.
    coupling: ``λ ≥ 0``.
  """
  branches: tuple
  coupling: float = 0.0

  def _coupling_residuals(self, z, operators):
    return [z[i + 1] - down(z[i], operators["down"][i])
            for i in range(len(self.branches) - 1)]

  def smooth_value(self, z, operators):
    value = sum(branch.value(zi, ops) for branch, zi, ops
                in zip(self.branches, z, operators["branches"]))
    if self.coupling:
      value = value + 0.5 * self.coupling * sum(
          per_sample_dot(r, r) for r in self._coupling_residuals(z, operators))
    return value

  def smooth_gradient(self, z, operators):
    gradient = [branch.gradient(zi, ops) for branch, zi, ops
                in zip(self.branches, z, operators["branches"])]
    if self.coupling:
      for i, residual in enumerate(self._coupling_residuals(z, operators)):
        gradient[i] = gradient[i] - self.coupling * down_transpose(
            residual, operators["down"][i])
        gradient[i + 1] = gradient[i + 1] + self.coupling * residual
    return tuple(gradient)


class MultiBranchCell(OptimizationCell):
  """A cell over branches ``i = 0, 1, …`` (finest first), branch ``i`` at ``1/2^i`` of
  the input features' resolution, whose objective is a :class:`MultiBranchObjective`.

  Subclasses set ``channels`` (per branch), ``down_maps`` (the channel maps ``P_i``
  of the coupling; empty without it) and ``objective_spec``, and implement
  :meth:`branch_operators`.
  """

  channels: tuple[int, ...]
  down_maps: Sequence[Any]

  @abc.abstractmethod
  def branch_operators(self, x: jax.Array) -> list[Operators]:
    """The per-branch operators for the input features ``x``, finest first."""

  def operators(self, x: jax.Array) -> dict:
    return {"branches": tuple(self.branch_operators(x)),
            "down": tuple(m.normalized_matrix() for m in self.down_maps)}

  def initial_state(self, x: jax.Array) -> tuple:
    """Zeros: branch ``i`` of shape ``(B, H/2^i, W/2^i, channels[i])``."""
    batch, height, width, _ = x.shape
    return tuple(jnp.zeros((batch, height >> i, width >> i, c), x.dtype)
                 for i, c in enumerate(self.channels))

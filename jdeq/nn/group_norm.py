"""GroupNorm of NHWC features, per sample, with its statistics in one pass over the input.

``y = (x − μ_g) / sqrt(σ²_g + ε) · γ + β``, with the mean ``μ_g`` and the biased
variance ``σ²_g`` of each sample's group ``g`` of ``C / G`` channels over all pixels.

The statistics are read in a single pass: per channel over the image, the sums of
``x − k`` and ``(x − k)²`` in one (variadic) reduction, where the shift ``k`` is the
channel's value at the first pixel. Then, on the tiny ``(B, C)`` sums, each channel's
mean and sum of squared deviations are formed and combined over the channels of a
group with the pairwise-variance formula (Chan et al.). The shift keeps the variance
as accurate as the two-pass form's (centre, then square) when ``|μ| ≫ σ``, where the
unshifted ``E[x²] − μ²`` loses every digit (float32, ``μ = 10³ σ``: error 0.2 against
1e-4). Against the two-pass form this saves two of the five passes over ``x`` that a
normalization costs forward (timings in ``docs/benchmarks.md``). Reducing the spatial axes first also suits XLA's CPU reductions
better than a reduction over the grouped axes ``(H, W, C/G)`` (``flax.nnx.GroupNorm``'s
form).

Reverse mode does not differentiate the variadic reduction (JAX's rule for a
general reduction is slow): :func:`_spatial_sums` has a JVP of plain sums, which
JAX transposes into broadcasts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _check_groups(channels: int, num_groups: int) -> None:
  if num_groups < 1 or channels % num_groups:
    raise ValueError(f"GroupNorm: {channels} channels cannot be split into "
                     f"{num_groups} groups")


def _add_pairs(a, b):
  return a[0] + b[0], a[1] + b[1]


@jax.custom_jvp
def _spatial_sums(p: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(Σ_hw p, Σ_hw q)`` of two NHWC arrays, ``(B, C)`` each, in one pass.

  Rows first, then the ``(B, H, C)`` row sums: XLA:CPU accumulates a variadic
  reduction sequentially, so one reduction over ``H·W`` terms has a float32 error
  growing with ``H·W`` (GroupNorm of a 32×32 map: 4e-6 relative against float64),
  while two of ``W`` and ``H`` terms keep it at the two-pass form's level (1e-7).
  The second reduction reads ``1/W`` of the data.
  """
  zero = jnp.zeros((), p.dtype)
  rows = jax.lax.reduce((p, q), (zero, zero), _add_pairs, (2,))
  return jax.lax.reduce(rows, (zero, zero), _add_pairs, (1,))


@_spatial_sums.defjvp
def _spatial_sums_jvp(primals, tangents):
  p_dot, q_dot = tangents
  return _spatial_sums(*primals), (jnp.sum(p_dot, axis=(1, 2)), jnp.sum(q_dot, axis=(1, 2)))


def group_norm_nhwc(x: jax.Array, num_groups: int, scale: jax.Array | None,
                    bias: jax.Array | None, epsilon: float) -> jax.Array:
  """GroupNorm of an NHWC array (``scale``/``bias``: ``(C,)`` or None)."""
  if x.ndim != 4:
    raise ValueError(f"GroupNorm expects NHWC features, got shape {x.shape}")
  b, h, w, c = x.shape
  _check_groups(c, num_groups)
  per_group = c // num_groups
  pixels = h * w

  # The shift is a constant of the formula (any value gives the same statistics),
  # so it carries no derivative.
  shift = jax.lax.stop_gradient(x[:, :1, :1, :])
  deviation = x - shift
  sums, squares = _spatial_sums(deviation, jnp.square(deviation))  # (B, C) each
  channel_mean = sums / pixels
  channel_m2 = jnp.maximum(squares - sums * channel_mean, 0.0)  # Σ (x − mean_c)²
  channel_mean = (channel_mean + shift[:, 0, 0, :]).reshape(b, num_groups, per_group)
  mean = jnp.mean(channel_mean, axis=2)  # (B, G)
  spread = jnp.square(channel_mean - mean[..., None])
  variance = (jnp.sum(channel_m2.reshape(b, num_groups, per_group), axis=2)
              + pixels * jnp.sum(spread, axis=2)) / (pixels * per_group)

  def per_channel(stat):  # (B, G) → (B, C)
    return jnp.repeat(stat, per_group, axis=1)

  gain = per_channel(jax.lax.rsqrt(variance + epsilon))
  if scale is not None:
    gain = gain * scale
  offset = -per_channel(mean) * gain
  if bias is not None:
    offset = offset + bias
  return x * gain[:, None, None, :] + offset[:, None, None, :]


class GroupNorm(nnx.Module):
  """Per-sample GroupNorm over NHWC features; parameters named as ``nnx.GroupNorm``'s.

  Attributes:
    num_groups: number of channel groups ``G``.
    epsilon: added to the variance.
    scale, bias: learned ``(C,)`` affine parameters (``None`` when not affine).
  """

  def __init__(self, num_features: int, num_groups: int, *, epsilon: float,
               affine: bool = True, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # the parameters start at 1 and 0
    _check_groups(num_features, num_groups)
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype)) if affine else None
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    return group_norm_nhwc(x, self.num_groups, scale, bias, self.epsilon)

"""Variational (locked) dropout for equilibrium cells.

An equilibrium is only defined if the map is the same at every iteration, so the
dropout mask is drawn once per forward pass and reused by every solver iteration
and by the backward pass (Bai et al., 2019/2020; Gal & Ghahramani, 2016). In an
image cell one Bernoulli draw is made per sample and channel and shared over all
spatial positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def variational_dropout_mask(key: jax.Array, batch_size: int, channels: int,
                             rate: float, *, spatial_dims: int = 2,
                             dtype=jnp.float32) -> jax.Array:
  """Draws the inverted-dropout mask ``m = Bernoulli(1 − p) / (1 − p)``.

  ``E[m] = 1``, so no rescaling is needed at evaluation time (where no mask is used).

  Args:
    key: PRNG key.
    batch_size: ``B``.
    channels: ``C``.
    rate: drop probability ``p ∈ [0, 1)``.
    spatial_dims: number of spatial axes the mask is broadcast over (2 for NHWC
      images, 0 for feature vectors).
    dtype: mask dtype.

  Returns:
    Array of shape ``(B, 1, …, 1, C)`` with ``spatial_dims`` singleton axes.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
  shape = (batch_size,) + (1,) * spatial_dims + (channels,)
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)

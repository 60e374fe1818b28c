"""Transformer-XL relative-position attention (Dai et al., 2019) as pure functions.

A query at absolute position ``t`` attends to the keys of positions ``s ≤ t`` over
``[memory; segment]``. With ``q_t, k_s, v_s`` the per-head projections, ``r_δ`` the
projected sinusoidal embedding of the distance ``δ = t − s`` and the learned biases
``r_w`` (content) and ``r_r`` (position), the score is

    a_{t,s} = ((q_t + r_w) · k_s + (q_t + r_r) · r_{t−s}) / √d_head,

masked to ``s ≤ t`` and to valid keys, soft-maxed over ``s``. The position term is
first computed against every distance row ``r_j`` (``j = 0 … K−1`` holding the
distances ``K−1 … 0``) and then moved into place by :func:`rel_shift`, which costs a
pad and two reshapes instead of a gather.

Layouts: ``(B, L, H, D)`` for per-head projections, ``(B, H, L_q, L_k)`` for scores.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def sinusoid_embedding(distances: jax.Array, dim: int) -> jax.Array:
  """The sinusoidal embedding ``[sin(δ ω), cos(δ ω)]`` of each distance ``δ``.

  ``ω_i = 10000^{−2i/dim}`` for ``i = 0 … dim/2 − 1`` (Vaswani et al., 2017): the
  first half of the features holds the sines, the second half the cosines.

  Args:
    distances: ``(K,)`` floating distances.
    dim: the (even) embedding width.

  Returns:
    ``(K, dim)``, in the dtype of ``distances``.
  """
  if dim % 2:
    raise ValueError(f"sinusoid_embedding: dim must be even, got {dim}")
  dtype = distances.dtype
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=dtype) / dim))
  angles = distances[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_distances(key_len: int, dtype=jnp.float32) -> jax.Array:
  """The distances ``K−1, K−2, …, 0`` of the positional rows (``K = key_len``)."""
  return jnp.arange(key_len - 1, -1, -1, dtype=dtype)


def rel_shift(scores: jax.Array) -> jax.Array:
  """Aligns position scores computed against the distance rows with the keys.

  With ``L_q ≤ L_k`` queries at the last ``L_q`` of ``L_k`` positions and row ``j``
  of the input holding the score against distance ``L_k − 1 − j``, the output at
  ``[i, s]`` is the score of query ``i`` against distance ``(L_k − L_q + i) − s``,
  i.e. ``out[i, s] = in[i, s + L_q − 1 − i]``, for every causal pair
  ``s ≤ i + L_k − L_q``. Entries above that diagonal hold unrelated values and must
  be masked. Implemented by a zero column in front, a reshape to
  ``(L_k + 1, L_q)``, dropping the first row and reshaping back.

  Args:
    scores: ``(…, L_q, L_k)``.

  Returns:
    ``(…, L_q, L_k)``.
  """
  *lead, q_len, k_len = scores.shape
  padded = jnp.pad(scores, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
  padded = padded.reshape(*lead, k_len + 1, q_len)
  return padded[..., 1:, :].reshape(*lead, q_len, k_len)


def causal_mask(query_len: int, key_len: int) -> jax.Array:
  """``(L_q, L_k)`` bool: query ``i`` (at position ``L_k − L_q + i``) sees key ``s``."""
  offset = key_len - query_len
  return jnp.arange(key_len)[None, :] <= jnp.arange(query_len)[:, None] + offset


def relative_attention(q: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                       r_w_bias: jax.Array, r_r_bias: jax.Array,
                       key_valid: jax.Array,
                       prob_mask: Optional[jax.Array] = None) -> jax.Array:
  """Relative-position multi-head attention of the last ``L_q`` of ``L_k`` positions.

  Args:
    q: ``(B, L_q, H, D)`` queries (the segment's positions).
    k, v: ``(B, L_k, H, D)`` keys and values over ``[memory; segment]``.
    r: ``(L_k, H, D)`` projected positional embeddings of the distances
      ``L_k − 1 … 0`` (see :func:`relative_distances`).
    r_w_bias, r_r_bias: ``(H, D)`` content and position biases.
    key_valid: ``(B, L_k)``, nonzero where the key is a real position (invalid
      memory slots are excluded from every query's softmax).
    prob_mask: optional ``(B, H, L_q, L_k)`` multiplicative mask of the attention
      probabilities (dropout, applied after the softmax as in the reference).

  Returns:
    ``(B, L_q, H, D)`` attention-weighted values.
  """
  q_len, k_len, d_head = q.shape[1], k.shape[1], q.shape[-1]
  content = jnp.einsum("bihd,bjhd->bhij", q + r_w_bias, k)
  position = rel_shift(jnp.einsum("bihd,jhd->bhij", q + r_r_bias, r))
  scores = (content + position) * (1.0 / d_head ** 0.5)
  allowed = causal_mask(q_len, k_len)[None, None] & (key_valid[:, None, None, :] > 0)
  # Every query sees at least itself, so no row is all masked and the softmax of
  # the finite minimum gives exact zeros without NaN in either direction.
  scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if prob_mask is not None:
    probs = probs * prob_mask
  return jnp.einsum("bhij,bjhd->bihd", probs, v)

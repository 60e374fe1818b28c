"""Adaptive input embeddings and the adaptive softmax over a frequency-sorted vocabulary.

The vocabulary ``[0, V)`` is sorted by decreasing frequency and split by the cutoffs
``c₁ < … < c_n`` into a head cluster ``[0, c₁)`` and tail clusters
``[c_i, c_{i+1})`` (``c_{n+1} = V``). Cluster ``i`` has embeddings of width
``d_i = d_embed // div_val^i`` projected to the model width ``d_proj`` (Baevski &
Auli, 2019), so rare words cost few parameters; with ``div_val = 1`` one table of
width ``d_embed`` serves all clusters, with a projection only when
``d_embed ≠ d_proj``. The embedding is scaled by ``√d_proj``.

The adaptive softmax (Grave et al., 2017) factorizes ``p(w | h)``: the head scores
the ``c₁`` head words and one token per tail cluster,

    log p(w) = log softmax(h P₀ᵀ [E₀; C]ᵀ + [b₀; c])_w                    (w in the head),
    log p(w) = log p_head(cluster i) + log softmax(h P_iᵀ E_iᵀ + b_i)_w     (w in cluster i),

with ``E_i`` the output weights of cluster ``i`` (tied to the input tables),
``P_i`` its projection (optionally tied to the input projection) and ``C, c`` the
cluster tokens' weights and biases. As in the reference (Transformer-XL's
``ProjectedAdaptiveLogSoftmax``), tail cluster ``i`` (1-based) is scored by the
head's column ``−i``: cluster 1 by the last cluster token, cluster ``n`` by the
first. Without cutoffs this is a plain (tied) softmax.

Shapes are static under ``jit``: every cluster is evaluated for every position and
the target's cluster selected, where the reference gathers the positions of each
cluster (a data-dependent shape). Each tail is wrapped in ``jax.checkpoint`` so its
``(N, V_i)`` logits are recomputed in the backward pass instead of stored.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """``((0, c₁), (c₁, c₂), …, (c_n, V))``: the half-open token ranges of the clusters."""
  edges = (0, *cutoffs, vocab_size)
  return tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))


def cluster_widths(d_embed: int, num_clusters: int, div_val: int) -> tuple[int, ...]:
  """``d_embed // div_val^i`` for each cluster ``i`` (all ``d_embed`` when ``div_val = 1``)."""
  return tuple(d_embed // div_val ** i for i in range(num_clusters))


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


class AdaptiveEmbedding(nnx.Module):
  """Token ids ``(…)`` → ``√d_proj · E_{c(w)}[w − l_c] P_c``, shape ``(…, d_proj)``.

  Attributes:
    tables: one ``(V_i, d_i)`` Param per cluster (a single ``(V, d_embed)`` table when
      ``div_val = 1``).
    projections: one ``(d_i, d_proj)`` Param per table, or none when ``div_val = 1``
      and ``d_embed = d_proj``.
  """

  def __init__(self, vocab_size: int, d_embed: int, d_proj: int,
               cutoffs: Sequence[int] = (), *, div_val: int = 1,
               init_std: float = 0.01, proj_init_std: float = 0.01, rngs: nnx.Rngs):
    self.vocab_size = vocab_size
    self.d_embed = d_embed
    self.d_proj = d_proj
    self.div_val = div_val
    self.bounds = cluster_bounds(vocab_size, cutoffs)
    if div_val == 1:
      table_bounds, widths = ((0, vocab_size),), (d_embed,)
    else:
      table_bounds, widths = self.bounds, cluster_widths(d_embed, len(self.bounds), div_val)
    self.table_bounds = table_bounds
    self.widths = widths
    self.tables = nnx.List([
        nnx.Param(_normal(rngs.params(), (hi - lo, width), init_std))
        for (lo, hi), width in zip(table_bounds, widths)])
    projected = div_val > 1 or d_embed != d_proj
    self.projections = nnx.List([
        nnx.Param(_normal(rngs.params(), (width, d_proj), proj_init_std))
        for width in widths] if projected else [])

  def projection(self, index: int):
    """The ``(d_i, d_proj)`` projection of table ``index`` (None if it has none)."""
    return self.projections[index][...] if len(self.projections) else None

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Embeds integer ``tokens`` of any shape; ids outside ``[0, V)`` embed as zeros."""
    out = None
    for index, (lo, hi) in enumerate(self.table_bounds):
      table = self.tables[index][...]
      local = jnp.clip(tokens - lo, 0, hi - lo - 1)
      emb = jnp.take(table, local, axis=0)
      proj = self.projection(index)
      if proj is not None:
        emb = emb @ proj
      inside = ((tokens >= lo) & (tokens < hi))[..., None]
      emb = jnp.where(inside, emb, jnp.zeros((), emb.dtype))
      out = emb if out is None else out + emb
    return out * jnp.asarray(self.d_proj ** 0.5, out.dtype)


class AdaptiveSoftmax(nnx.Module):
  """The adaptive log-softmax over the clusters of an :class:`AdaptiveEmbedding`.

  Tied output weights (``tie_weights``) are the embedding's tables; a tied
  projection (``tie_projs[i]``) is the embedding's projection of cluster ``i``
  (of its single table when ``div_val = 1``). Everything else lives here: the
  output biases, the cluster tokens' weights and biases, and untied weights and
  projections. The methods take the embedding as an argument, so the tied
  Params have one owner.

  Attributes:
    biases: ``(V_i,)`` output biases per cluster.
    cluster_weight, cluster_bias: ``(n, d_embed)`` and ``(n,)`` (absent without
      tail clusters).
    weights: untied ``(V_i, d_i)`` output weights (empty when tied).
    projections: the untied ``(d_i, d_proj)`` projections, in cluster order.
    projection_kinds: per cluster ``"none"``, ``"tied"`` or ``"own"``.
  """

  def __init__(self, embedding: AdaptiveEmbedding, *, tie_weights: bool = True,
               tie_projs: Sequence[bool] = (), init_std: float = 0.01,
               proj_init_std: float = 0.01, rngs: nnx.Rngs):
    bounds = embedding.bounds
    n_tail = len(bounds) - 1
    tie_projs = tuple(tie_projs) + (False,) * (len(bounds) - len(tie_projs))
    self.bounds = bounds
    self.d_embed = embedding.d_embed
    self.d_proj = embedding.d_proj
    self.div_val = embedding.div_val
    self.tie_weights = tie_weights
    self.widths = (embedding.widths * len(bounds) if embedding.div_val == 1
                   else embedding.widths)
    self.biases = nnx.List([nnx.Param(jnp.zeros((hi - lo,), jnp.float32))
                            for lo, hi in bounds])
    if n_tail:
      self.cluster_weight = nnx.Param(_normal(rngs.params(), (n_tail, self.d_embed),
                                              init_std))
      self.cluster_bias = nnx.Param(jnp.zeros((n_tail,), jnp.float32))
    else:
      self.cluster_weight = self.cluster_bias = None
    self.weights = nnx.List([] if tie_weights else [
        nnx.Param(_normal(rngs.params(), (hi - lo, width), init_std))
        for (lo, hi), width in zip(bounds, self.widths)])
    projected = embedding.div_val > 1 or embedding.d_embed != embedding.d_proj
    kinds = tuple("none" if not projected else "tied" if tie_projs[i] else "own"
                  for i in range(len(bounds)))
    self.projection_kinds = kinds
    self.projections = nnx.List([
        nnx.Param(_normal(rngs.params(), (self.widths[i], self.d_proj), proj_init_std))
        for i, kind in enumerate(kinds) if kind == "own"])

  # -- the per-cluster pieces -------------------------------------------------------
  def _weight(self, index: int, embedding: AdaptiveEmbedding) -> jax.Array:
    if not self.tie_weights:
      return self.weights[index][...]
    if embedding.div_val == 1:
      lo, hi = self.bounds[index]
      return embedding.tables[0][...][lo:hi]
    return embedding.tables[index][...]

  def _projection(self, index: int, embedding: AdaptiveEmbedding):
    kind = self.projection_kinds[index]
    if kind == "none":
      return None
    if kind == "tied":
      return embedding.projection(0 if embedding.div_val == 1 else index)
    own = sum(1 for k in self.projection_kinds[:index] if k == "own")
    return self.projections[own][...]

  def _logits(self, hidden: jax.Array, weight: jax.Array, bias: jax.Array,
              proj) -> jax.Array:
    if proj is not None:
      hidden = hidden @ proj.T
    return hidden @ weight.T + bias

  def _head_log_probs(self, hidden: jax.Array, embedding: AdaptiveEmbedding) -> jax.Array:
    """``(…, c₁ + n)`` log-probabilities of the head words and cluster tokens."""
    weight, bias = self._weight(0, embedding), self.biases[0][...]
    if self.cluster_weight is not None:
      weight = jnp.concatenate([weight, self.cluster_weight[...]], axis=0)
      bias = jnp.concatenate([bias, self.cluster_bias[...]], axis=0)
    logits = self._logits(hidden, weight, bias, self._projection(0, embedding))
    return jax.nn.log_softmax(logits, axis=-1)

  def _cluster_column(self, index: int) -> int:
    """The head column that scores tail cluster ``index`` (the reference's ``−index``)."""
    return self.bounds[0][1] + len(self.bounds) - 1 - index

  # -- public -----------------------------------------------------------------------
  def token_log_probs(self, hidden: jax.Array, targets: jax.Array,
                      embedding: AdaptiveEmbedding) -> jax.Array:
    """``log p(targets | hidden)``, shape ``targets.shape``, float32 or wider.

    Args:
      hidden: ``(…, d_proj)`` states the softmax reads.
      targets: integer ids of shape ``hidden.shape[:-1]``.
      embedding: the :class:`AdaptiveEmbedding` whose Params are tied here.
    """
    head = self._head_log_probs(hidden, embedding)
    head_size = self.bounds[0][1]
    local = jnp.clip(targets, 0, head_size - 1)
    out = jnp.take_along_axis(head, local[..., None], axis=-1)[..., 0]
    for index in range(1, len(self.bounds)):
      lo, hi = self.bounds[index]
      weight, bias = self._weight(index, embedding), self.biases[index][...]
      proj = self._projection(index, embedding)

      @jax.checkpoint
      def tail(hidden, weight, bias, proj, targets, lo=lo, hi=hi):
        logits = self._logits(hidden, weight, bias, proj)
        picked = jnp.take_along_axis(
            logits, jnp.clip(targets - lo, 0, hi - lo - 1)[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

      log_prob = head[..., self._cluster_column(index)] + tail(
          hidden, weight, bias, proj, targets)
      out = jnp.where((targets >= lo) & (targets < hi), log_prob, out)
    return out

  def log_probs(self, hidden: jax.Array, embedding: AdaptiveEmbedding) -> jax.Array:
    """The full ``(…, V)`` log-distribution (for tests and small vocabularies)."""
    head = self._head_log_probs(hidden, embedding)
    parts = [head[..., :self.bounds[0][1]]]
    for index in range(1, len(self.bounds)):
      logits = self._logits(hidden, self._weight(index, embedding),
                            self.biases[index][...], self._projection(index, embedding))
      parts.append(head[..., self._cluster_column(index), None]
                   + jax.nn.log_softmax(logits, axis=-1))
    return jnp.concatenate(parts, axis=-1)


class AdaptiveVocabulary(nnx.Module):
  """The tied pair: :class:`AdaptiveEmbedding` (input) and :class:`AdaptiveSoftmax` (output).

  Attributes:
    embedding: the input embedding (owns the tied tables and projections).
    softmax: the output layer.
  """

  def __init__(self, vocab_size: int, d_embed: int, d_proj: int,
               cutoffs: Sequence[int] = (), *, div_val: int = 1,
               tie_weights: bool = True, tie_projs: Sequence[bool] = (),
               init_std: float = 0.01, proj_init_std: float = 0.01, rngs: nnx.Rngs):
    self.vocab_size = vocab_size
    self.embedding = AdaptiveEmbedding(vocab_size, d_embed, d_proj, cutoffs,
                                       div_val=div_val, init_std=init_std,
                                       proj_init_std=proj_init_std, rngs=rngs)
    self.softmax = AdaptiveSoftmax(self.embedding, tie_weights=tie_weights,
                                   tie_projs=tie_projs, init_std=init_std,
                                   proj_init_std=proj_init_std, rngs=rngs)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """``(…)`` ids → ``(…, d_proj)`` scaled embeddings."""
    return self.embedding(tokens)

  def token_log_probs(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """``(…)`` log-probabilities of ``targets`` given ``hidden`` ``(…, d_proj)``."""
    return self.softmax.token_log_probs(hidden, targets, self.embedding)

  def log_probs(self, hidden: jax.Array) -> jax.Array:
    """``(…, V)`` log-distribution for ``hidden`` ``(…, d_proj)``."""
    return self.softmax.log_probs(hidden, self.embedding)

"""The DEQ-Transformer language model: attention, adaptive softmax, memory, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from jdeq import models, nn
from jdeq.models import deq_transformer as dt
from jdeq.models.deq_transformer import attention
from tests import helpers

# Broyden with a long memory: a post-LN cell's Jacobian has eigenvalues near 1 (z
# passes through LN(z + a)), where Anderson stalls far above these tolerances.
_BROYDEN = jdeq.Broyden(max_iter=200, tol=1e-11, stop_mode="rel", memory=200)
TIGHT = dict(solver=_BROYDEN, eval_solver=_BROYDEN, grad=jdeq.IFT(_BROYDEN))


def _config(**overrides):
  """A tiny adaptive model: V = 23 in clusters [0, 6), [6, 14), [14, 23)."""
  options = dict(vocab_size=23, d_model=16, n_head=2, d_head=8, d_inner=24, tgt_len=4,
                 mem_len=5, cutoffs=(6, 14), div_val=2, **TIGHT)
  options.update(overrides)
  return dt.DEQTransformerConfig(**options)


def _float64(model):
  """``(graphdef, params, rest)`` of ``model`` with every float leaf in float64."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cast = lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return graphdef, jax.tree.map(cast, params), jax.tree.map(cast, rest)


def _tokens(key, batch, length, vocab=23):
  return jax.random.randint(jax.random.key(key), (batch, length), 0, vocab)


# -- attention ------------------------------------------------------------------------

def _sinusoid_numpy(distance, dim):
  inv_freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
  return np.concatenate([np.sin(distance * inv_freq), np.cos(distance * inv_freq)])


def test_rel_shift_attention_equals_direct_relative_computation(x64):
  batch, q_len, mem, heads, d_head, d_model = 2, 5, 3, 2, 4, 6
  k_len = mem + q_len
  keys = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(keys[0], (batch, q_len, heads, d_head))
  k = jax.random.normal(keys[1], (batch, k_len, heads, d_head))
  v = jax.random.normal(keys[2], (batch, k_len, heads, d_head))
  w_r = jax.random.normal(keys[3], (d_model, heads * d_head))
  r_w = jax.random.normal(keys[4], (heads, d_head))
  r_r = jax.random.normal(keys[5], (heads, d_head))
  valid = np.ones((batch, k_len))
  valid[0, :2] = 0  # two empty memory slots in the first row
  positions = attention.sinusoid_embedding(
      attention.relative_distances(k_len, jnp.float64), d_model)
  r = (positions @ w_r).reshape(k_len, heads, d_head)
  got = attention.relative_attention(q, k, v, r, r_w, r_r, jnp.asarray(valid))

  q, k, v, w_r, r_w, r_r = map(np.asarray, (q, k, v, w_r, r_w, r_r))
  want = np.zeros((batch, q_len, heads, d_head))
  for b in range(batch):
    for h in range(heads):
      for i in range(q_len):
        t = mem + i  # the query's absolute position
        scores, values = [], []
        for s in range(t + 1):
          if not valid[b, s]:
            continue
          rel = (_sinusoid_numpy(t - s, d_model) @ w_r).reshape(heads, d_head)[h]
          scores.append(((q[b, i, h] + r_w[h]) @ k[b, s, h]
                         + (q[b, i, h] + r_r[h]) @ rel) / math.sqrt(d_head))
          values.append(v[b, s, h])
        p = np.exp(np.array(scores) - max(scores))
        want[b, i, h] = (p / p.sum()) @ np.array(values)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


def test_rel_shift_moves_distance_rows_into_place():
  q_len, k_len = 3, 5
  # Row j of the input scores distance k_len - 1 - j; encode (query, distance).
  scores = np.array([[100 * i + (k_len - 1 - j) for j in range(k_len)]
                     for i in range(q_len)], np.float32)
  shifted = np.asarray(attention.rel_shift(jnp.asarray(scores)))
  for i in range(q_len):
    for s in range(k_len - q_len + i + 1):
      assert shifted[i, s] == 100 * i + (k_len - q_len + i - s)


# -- the model ------------------------------------------------------------------------

def test_causality_perturbing_a_token_changes_no_earlier_output(x64):
  model = _config(mem_len=3).build(rngs=nnx.Rngs(1))
  graphdef, params, rest = _float64(model)
  memory = jax.tree.map(lambda a: a.astype(jnp.float64), model.init_memory(2))

  @jax.jit(static_argnames="unrolled")
  def run(tokens, unrolled):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return m(tokens, memory=memory, train=False, unrolled=unrolled)[0]

  tokens = _tokens(0, 2, 7)
  t = 4
  perturbed = tokens.at[:, t].set((tokens[:, t] + 5) % 23)
  for unrolled in (True, False):
    before, after = run(tokens, unrolled), run(perturbed, unrolled)
    # Exact in the unrolled mode; to the solver's tolerance at the equilibrium
    # (the mixing weights of a solve see the whole sequence).
    tol = 1e-13 if unrolled else 1e-8
    np.testing.assert_allclose(after[:, :t], before[:, :t], atol=tol)
    assert float(jnp.min(jnp.abs(after[:, t:] - before[:, t:]).max(axis=-1))) > 1e-6


def test_first_segment_memory_is_masked_and_next_memory_holds_the_equilibrium(x64):
  """Segment recurrence against one solve over both segments without memory.

  With ``M >= L`` the second segment's memory holds all of the first: the joint
  fixed point over 2L positions restricted to the first L is the first segment's
  equilibrium (causality), and on the last L it solves the second segment's
  equation with that memory. So segment-by-segment must equal the joint solve.
  """
  length = 4
  tokens = _tokens(2, 2, 2 * length)
  with_memory = _config(mem_len=5).build(rngs=nnx.Rngs(3))
  without = _config(mem_len=0).build(rngs=nnx.Rngs(3))  # the same parameters
  g_mem, p_mem, r_mem = _float64(with_memory)
  g_none, p_none, r_none = _float64(without)

  @jax.jit
  def segments(tokens):
    m = nnx.merge(g_mem, p_mem, r_mem, copy=True)
    memory = jax.tree.map(lambda a: a.astype(jnp.float64), m.init_memory(2))
    first, aux1 = m(tokens[:, :length], memory=memory, train=False)
    second, aux2 = m(tokens[:, length:], memory=aux1.memory, train=False)
    return first, second, aux1, aux2

  @jax.jit
  def joint(tokens):
    m = nnx.merge(g_none, p_none, r_none, copy=True)
    return m(tokens, memory=m.init_memory(2), train=False)[0]

  first, second, aux1, aux2 = segments(tokens)
  alone = joint(tokens[:, :length])
  both = joint(tokens)
  # An all-invalid memory computes what no memory computes.
  np.testing.assert_allclose(first, alone, atol=1e-9)
  np.testing.assert_allclose(second, both[:, length:], atol=1e-8)
  np.testing.assert_allclose(first, both[:, :length], atol=1e-8)
  # The next memory: the last M = 5 positions of [memory; z*].
  np.testing.assert_array_equal(aux1.memory.valid, [[0, 1, 1, 1, 1]] * 2)
  np.testing.assert_array_equal(aux1.memory.hidden[:, 1:], first)
  np.testing.assert_array_equal(aux2.memory.valid, np.ones((2, 5)))
  np.testing.assert_array_equal(aux2.memory.hidden[:, :1], first[:, -1:])
  np.testing.assert_array_equal(aux2.memory.hidden[:, 1:], second)
  assert bool(jnp.all(aux1.stats.converged)) and bool(jnp.all(aux2.stats.converged))


def _random_memory(key, batch, mem_len, invalid, d_model=16, width=48, dtype=jnp.float32):
  """A memory whose first ``invalid`` slots are empty (zeros, as the model leaves them)."""
  keys = jax.random.split(jax.random.key(key), 2)
  valid = (jnp.arange(mem_len) >= invalid).astype(jnp.float32)[None].repeat(batch, 0)
  return dt.Memory(jax.random.normal(keys[0], (batch, mem_len, d_model), dtype)
                   * valid[..., None].astype(dtype),
                   0.1 * jax.random.normal(keys[1], (batch, mem_len, width), dtype)
                   * valid[..., None].astype(dtype), valid)


def test_memory_is_stop_gradient_and_training_reads_f_of_z_star(x64):
  # Float64 and a tight tolerance: the check below compares two separate solves.
  solver = jdeq.Broyden(max_iter=100, tol=1e-11, memory=100)
  model = _config(solver=solver, eval_solver=solver,
                  grad=jdeq.IFT(jdeq.Broyden(max_iter=20, tol=1e-4))).build(
                      rngs=nnx.Rngs(0))
  model = nnx.merge(*_float64(model))
  tokens, targets = _tokens(4, 2, 4), _tokens(5, 2, 4)
  memory = _random_memory(0, 2, 5, invalid=1, dtype=jnp.float64)

  def loss(model, memory):
    hidden, aux = model(tokens, memory=memory, train=True)
    return -jnp.mean(model.token_log_probs(hidden, targets)), (hidden, aux)

  grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (hidden, aux)), (grads, memory_grads) = grad_fn(model, memory)
  for leaf in jax.tree.leaves(memory_grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  for part in ("vocab", "injection", "deq"):
    leaves = jax.tree.leaves(nnx.state(getattr(grads, part), nnx.Param))
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0, part
  # Without dropout the training output is f(z*) and is what the memory stores.
  np.testing.assert_array_equal(aux.memory.hidden[:, 1:], hidden)

  @nnx.jit
  def equilibrium_and_map(model):
    z_star, _ = model(tokens, memory=memory, train=False)
    u = model.injection(model.vocab.embed(tokens))
    inputs = dt.CellInput(jnp.concatenate([memory.injection, u], 1), memory.hidden,
                          memory.valid)
    cell = model.deq.cell
    return z_star, cell(z_star, inputs, cell.prepare(inputs, train=True, key=None))

  assert bool(jnp.all(aux.stats.converged)), aux.stats.rel_residual
  z_star, f_star = equilibrium_and_map(model)
  np.testing.assert_allclose(hidden, f_star, atol=1e-8)
  assert float(jnp.abs(hidden - z_star).max()) > 0  # one more application, not z*


def test_reset_memory_clears_the_selected_rows():
  model = _config().build(rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(0), 2)
  memory = dt.Memory(jax.random.normal(keys[0], (3, 5, 16)),
                     jax.random.normal(keys[1], (3, 5, 48)), jnp.ones((3, 5)))
  cleared = jax.jit(model.reset_memory)(memory, jnp.array([0, 1, 0]))
  for name in ("hidden", "injection", "valid"):
    before, after = getattr(memory, name), getattr(cleared, name)
    np.testing.assert_array_equal(after[1], np.zeros_like(before[1]))
    np.testing.assert_array_equal(after[::2], before[::2])
  empty = model.init_memory(3)
  assert empty.hidden.shape == (3, 5, 16) and float(empty.valid.sum()) == 0


# -- adaptive softmax -----------------------------------------------------------------

def _vocab(**overrides):
  options = dict(vocab_size=23, d_embed=12, d_proj=10, cutoffs=(6, 14), div_val=2,
                 tie_projs=(False, True, False), rngs=nnx.Rngs(7))
  options.update(overrides)
  vocab = dt.AdaptiveVocabulary(options.pop("vocab_size"), options.pop("d_embed"),
                                options.pop("d_proj"), options.pop("cutoffs"), **options)
  # Larger weights than the 0.01 initialisation, so the distribution is far from flat.
  params = [leaf for _, leaf in nnx.iter_graph(vocab) if isinstance(leaf, nnx.Param)]
  for index, leaf in enumerate(params):
    leaf.value = jax.random.normal(jax.random.key(index), leaf.shape, jnp.float64)
  return vocab


def test_adaptive_log_probs_are_normalized_and_match_the_factorization(x64):
  vocab = _vocab()
  hidden = jax.random.normal(jax.random.key(1), (3, 4, 10), jnp.float64)
  targets = jnp.arange(12).reshape(3, 4) * 2 % 23
  log_probs, token_log_probs = nnx.jit(
      lambda v: (v.log_probs(hidden), v.token_log_probs(hidden, targets)))(vocab)
  assert log_probs.shape == (3, 4, 23)
  np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), np.ones((3, 4)), rtol=1e-12)
  np.testing.assert_allclose(token_log_probs,
                             jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0],
                             rtol=1e-12)

  # The factorization written out: head over [words 0..5, cluster tokens c0, c1],
  # tail cluster i scored by the head column -i (the reference's convention).
  emb, soft = vocab.embedding, vocab.softmax
  tables = [np.asarray(t[...]) for t in emb.tables]
  in_projs = [np.asarray(p[...]) for p in emb.projections]
  own = iter(np.asarray(p[...]) for p in soft.projections)
  out_projs = [next(own), in_projs[1], next(own)]  # tie_projs = (False, True, False)
  biases = [np.asarray(b[...]) for b in soft.biases]
  h = np.asarray(hidden).reshape(-1, 10)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  head = log_softmax((h @ out_projs[0].T) @ np.concatenate(
      [tables[0], np.asarray(soft.cluster_weight[...])]).T
      + np.concatenate([biases[0], np.asarray(soft.cluster_bias[...])]))
  want = [head[:, :6]]
  for i, width in ((1, 6), (2, 3)):
    assert tables[i].shape[1] == width
    tail = log_softmax((h @ out_projs[i].T) @ tables[i].T + biases[i])
    want.append(head[:, [8 - i]] + tail)
  np.testing.assert_allclose(np.asarray(log_probs).reshape(-1, 23),
                             np.concatenate(want, axis=1), rtol=1e-10, atol=1e-12)


def test_adaptive_embedding_matches_table_lookup(x64):
  vocab = _vocab()
  tokens = jnp.array([[0, 5, 6, 13], [14, 22, 7, 1]])
  got = np.asarray(vocab.embed(tokens))
  emb = vocab.embedding
  bounds = [(0, 6), (6, 14), (14, 23)]
  for b in range(2):
    for t in range(4):
      w = int(tokens[b, t])
      c = next(i for i, (lo, hi) in enumerate(bounds) if lo <= w < hi)
      row = np.asarray(emb.tables[c][...])[w - bounds[c][0]] @ np.asarray(
          emb.projections[c][...])
      np.testing.assert_allclose(got[b, t], math.sqrt(10) * row, rtol=1e-12)


@pytest.mark.parametrize("d_embed", [10, 6])
def test_one_cluster_is_a_plain_tied_softmax(x64, d_embed):
  vocab = _vocab(cutoffs=(), div_val=1, d_embed=d_embed, tie_projs=(True,))
  hidden = jax.random.normal(jax.random.key(2), (2, 3, 10), jnp.float64)
  table = np.asarray(vocab.embedding.tables[0][...])
  bias = np.asarray(vocab.softmax.biases[0][...])
  h = np.asarray(hidden)
  if d_embed != 10:  # the tied projection maps d_proj back to d_embed
    h = h @ np.asarray(vocab.embedding.projections[0][...]).T
  logits = h @ table.T + bias
  want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(vocab.log_probs(hidden), want, rtol=1e-10)


@pytest.mark.parametrize("cutoffs", [(), (6, 14)])
def test_uniform_distribution_has_perplexity_equal_to_the_vocabulary(cutoffs):
  model = _config(cutoffs=cutoffs).build(rngs=nnx.Rngs(0))
  soft = model.vocab.softmax
  for table in model.vocab.embedding.tables:  # tied output weights → zero logits
    table[...] = jnp.zeros_like(table[...])
  if cutoffs:
    # A cluster token's logit log(V_i) gives each of its V_i words mass 1/V.
    sizes = [hi - lo for lo, hi in soft.bounds[1:]]
    soft.cluster_weight[...] = jnp.zeros_like(soft.cluster_weight[...])
    soft.cluster_bias[...] = jnp.log(jnp.array(sizes[::-1], jnp.float32))
  hidden = jax.random.normal(jax.random.key(0), (2, 4, 16))
  targets = _tokens(9, 2, 4)
  nll = -jnp.mean(model.token_log_probs(hidden, targets))
  np.testing.assert_allclose(float(jnp.exp(nll)), 23.0, rtol=1e-5)


# -- gradients and dropout ------------------------------------------------------------

def test_ift_gradient_with_memory_weight_norm_and_dropout_matches_finite_differences(x64):
  """Float64 IFT gradient of the whole model (fixed dropout keys) along random directions.

  The dropout masks enter the forward solve, f(z*) and the backward pass: a mask
  redrawn anywhere would make the implicit gradient disagree with the difference
  quotient of the loss computed with the same key.
  """
  config = _config(mem_len=5, dropout=0.1, dropatt=0.1, weight_norm=True)
  model = config.build(rngs=nnx.Rngs(5))
  graphdef, params, rest = _float64(model)
  tokens, targets = _tokens(6, 2, 4), _tokens(7, 2, 4)
  dropout_key = jax.random.key(11)
  memory = _random_memory(8, 2, 5, invalid=2, dtype=jnp.float64)  # 3 of 5 slots valid

  def loss_and_stats(params):
    m = nnx.merge(graphdef, params, rest, copy=True)
    hidden, aux = m.forward(tokens, memory, train=True, unrolled=False, budget=None,
                            jac_probes=0, dropout_key=dropout_key, jacobian_key=None)
    return -jnp.mean(m.token_log_probs(hidden, targets)), aux.stats

  grad = jax.jit(jax.grad(lambda p: loss_and_stats(p)[0]))(params)
  # The loss along a direction, shifted inside one program (central differences).
  along = jax.jit(lambda step, d: loss_and_stats(
      jax.tree.map(lambda p, d_: p + step * d_, params, d)))
  _, stats = along(0.0, params)
  assert bool(jnp.all(stats.converged)), stats.rel_residual
  eps = 1e-6
  for seed in range(2):
    direction = jax.tree.map(lambda r, p: r * (jnp.abs(p) + 1e-3),
                             helpers.random_like(jax.random.key(20 + seed), params), params)
    numeric = (along(eps, direction)[0] - along(-eps, direction)[0]) / (2 * eps)
    analytic = helpers.tree_vdot(grad, direction)
    error = abs(float(analytic - numeric)) / abs(float(numeric))
    assert error < 1e-4, (seed, error, float(analytic), float(numeric))


def test_dropout_masks_are_shared_by_every_iteration_and_the_backward_pass(monkeypatch):
  seen = []
  original = dt.DEQTransformerCell.__call__

  def recording(self, z, injection, prepared):
    masks = prepared["masks"]
    record = (masks["attn_out"], masks["ff1"], masks["ff2"], masks["attn"], prepared["r"])
    jax.debug.callback(lambda *arrays: seen.append([np.asarray(a) for a in arrays]),
                       *record)
    return original(self, z, injection, prepared)

  monkeypatch.setattr(dt.DEQTransformerCell, "__call__", recording)
  model = _config(dropout=0.2, dropatt=0.2,
                  solver=jdeq.Anderson(max_iter=8, tol=1e-12, m=6),
                  grad=jdeq.IFT(jdeq.Broyden(max_iter=6, tol=1e-12))).build(
                      rngs=nnx.Rngs(0))
  tokens, targets = _tokens(1, 2, 4), _tokens(2, 2, 4)

  def loss(model):
    hidden, _ = model(tokens, memory=model.init_memory(2), train=True)
    return -jnp.mean(model.token_log_probs(hidden, targets))

  step = nnx.jit(nnx.grad(loss))
  step(model)
  jax.effects_barrier()
  first_pass = list(seen)
  # 8 solver evaluations, f(z*), and the linearization the backward pass uses.
  assert len(first_pass) >= 10, len(first_pass)
  for record in first_pass[1:]:
    for a, b in zip(first_pass[0], record):
      np.testing.assert_array_equal(a, b)
  assert any(float(np.mean(a == 0)) > 0.05 for a in first_pass[0][:4])
  seen.clear()
  step(model)  # the next pass draws new masks
  jax.effects_barrier()
  assert not np.array_equal(seen[0][3], first_pass[0][3])


def _step_model():
  return _config(dropout=0.1, dropatt=0.05,
                 solver=jdeq.Anderson(max_iter=10, tol=1e-4, m=6),
                 grad=jdeq.IFT(jdeq.Broyden(max_iter=8, tol=1e-4))).build(rngs=nnx.Rngs(0))


def test_training_step_under_jit_with_jacobian_probes_and_budget():
  model = _step_model()
  tokens, targets = _tokens(1, 3, 4), _tokens(2, 3, 4)

  @nnx.jit
  def step(model, memory, budget):
    def loss(model):
      hidden, aux = model(tokens, memory=memory, train=True, budget=budget, jac_probes=1)
      nll = -jnp.mean(model.token_log_probs(hidden, targets))
      return nll + jnp.mean(aux.jac_loss), aux
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (value, aux), grads = step(model, model.init_memory(3), jnp.asarray(6))
  assert np.isfinite(float(value)) and aux.jac_loss.shape == (3,)
  assert bool(jnp.all(aux.jac_loss > 0)) and int(aux.stats.nstep.max()) <= 6
  np.testing.assert_array_equal(aux.memory.valid, [[0, 1, 1, 1, 1]] * 3)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def test_pretraining_mode_unrolls_two_applications():
  model = _step_model()
  tokens, targets = _tokens(1, 3, 4), _tokens(2, 3, 4)

  @nnx.jit
  def step(model):
    def loss(model):
      hidden, aux = model(tokens, memory=model.init_memory(3), train=True, unrolled=True)
      return -jnp.mean(model.token_log_probs(hidden, targets)), aux
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (value, aux), _ = step(model)
  np.testing.assert_array_equal(aux.stats.nstep, [2, 2, 2])
  assert np.isfinite(float(value))


# -- configurations -------------------------------------------------------------------

def _analytic_count(cfg):
  """Parameters of the architecture, counted from its definition."""
  d, width, inner, vocab = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner, cfg.vocab_size
  d_embed = cfg.d_embed or d
  edges = (0, *cfg.cutoffs, vocab)
  sizes = [b - a for a, b in zip(edges, edges[1:])]
  n_tail = len(sizes) - 1
  if cfg.div_val == 1:
    embedding = vocab * d_embed + (d_embed * d if d_embed != d else 0)
    own_projs = 0 if d_embed == d else sum(
        d_embed * d for tied in cfg.projection_ties if not tied)
  else:
    widths = [d_embed // cfg.div_val ** i for i in range(len(sizes))]
    embedding = sum(s * w for s, w in zip(sizes, widths)) + sum(w * d for w in widths)
    own_projs = sum(w * d for w, tied in zip(widths, cfg.projection_ties) if not tied)
  softmax = vocab + n_tail * (d_embed + 1) + own_projs
  injection = d * 3 * width + 3 * width
  weights = d * 3 * width + d * width + width * d + d * inner + inner * d
  biases = d + inner + d + 2 * width  # o_net, ff1, ff2, r_w, r_r
  gains = 3 * width + width + d + inner + d
  return embedding + softmax + injection + weights + biases + gains


DEQ_TRANSFORMERS = [n for n in models.list_configs() if n.startswith("deq_transformer")]


def test_the_reference_configurations_are_registered():
  assert {"deq_transformer_wt103_postln", "deq_transformer_wt103_postln_jr",
          "deq_transformer_wt103_preln_jr", "deq_transformer_wt2_small",
          "deq_transformer_wt2_small_preln"} <= set(DEQ_TRANSFORMERS)
  wt103 = {n: models.get_config(n) for n in DEQ_TRANSFORMERS if "wt103" in n}
  for name, (mem, f_thres, b_thres, pre_ln) in {
      "deq_transformer_wt103_postln": (150, 30, 35, False),
      "deq_transformer_wt103_postln_jr": (300, 12, 13, False),
      "deq_transformer_wt103_preln_jr": (300, 14, 14, True)}.items():
    cfg = wt103[name]
    assert (cfg.mem_len, cfg.solver.max_iter, cfg.grad.solver.max_iter, cfg.pre_ln) == (
        mem, f_thres, b_thres + 1, pre_ln), name
    assert (cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner,
            cfg.tgt_len, cfg.cutoffs, cfg.div_val, cfg.solver.m) == (
                267_735, 700, 10, 70, 48_000, 150, (20_000, 40_000, 200_000), 4, 6)


@pytest.mark.parametrize("name", DEQ_TRANSFORMERS)
def test_parameter_count(name):
  cfg = models.get_config(name)
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  count = nn.num_params(abstract)
  assert count == _analytic_count(cfg), (name, count, _analytic_count(cfg))
  ref = models.reference(name)
  if "wt103" in name:
    assert ref is not None
  if ref is not None:
    assert count == ref.params, (name, count, ref.params)


def test_bad_inputs_name_the_problem():
  model = _config().build(rngs=nnx.Rngs(0))
  memory = model.init_memory(2)
  with pytest.raises(ValueError, match="integer"):
    model(jnp.zeros((2, 4)), memory=memory, train=False)
  with pytest.raises(ValueError, match=r"shape \(B, L\)"):
    model(jnp.zeros((2,), jnp.int32), memory=memory, train=False)
  with pytest.raises(ValueError, match=r"memory.hidden.*batch 3"):
    model(jnp.zeros((3, 4), jnp.int32), memory=memory, train=False)
  with pytest.raises(ValueError, match="Memory"):
    model(jnp.zeros((2, 4), jnp.int32), memory=(1, 2, 3), train=False)
  with pytest.raises(ValueError, match="reset"):
    model.reset_memory(memory, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="targets"):
    model.token_log_probs(jnp.zeros((2, 4, 16)), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="cutoffs"):
    _config(cutoffs=(14, 6))
  with pytest.raises(ValueError, match="d_model must be even"):
    _config(d_model=15)
  with pytest.raises(ValueError, match="tie_projs"):
    _config(tie_projs=(True,))
  with pytest.raises(ValueError, match="dropatt"):
    _config(dropatt=1.0)
  with pytest.raises(ValueError, match="unknown option"):
    models.create("deq_transformer_wt2_small", rngs=nnx.Rngs(0), d_modle=3)

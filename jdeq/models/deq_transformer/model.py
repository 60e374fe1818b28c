"""The DEQ-Transformer language model (Bai, Kolter & Koltun, NeurIPS 2019).

One weight-tied Transformer-XL layer is solved for its equilibrium over each
segment of ``L`` tokens, with a segment-recurrent memory of the last ``M``
positions, as in the authors' DEQ-Sequence code (locuslab/deq) that the Jacobian
regularization paper (Bai, Koltun & Kolter, ICML 2021) trains on WikiText-103.

* **Input** — adaptive embedding ``e`` (:mod:`.adaptive`), locked dropout per
  (sample, channel), and the injection ``u = W_u e + b_u`` of width ``3·H·D``.
* **Cell** (:class:`DEQTransformerCell`) — with ``c = [m; z]`` (memory states, then
  the segment's states) and ``ũ = [u_m; u]`` (their injections):

    [q; k; v] = W_qkv c̃ + ũ,        c̃ = LN(c) (pre-LN) or c (post-LN),
    a = W_o RelAttn(q_segment, k, v; r = W_r drop(R)),
    post-LN:  y = LN(z + drop(a)),   f = LN(y + FFN(y)),
    pre-LN:   y = z + drop(a),       f = LN(y) + FFN(LN(y)),

  with ``FFN(x) = drop(W₂ drop(ReLU(W₁ x + b₁)) + b₂)``, ``R`` the sinusoidal
  embeddings of the distances ``K−1 … 0`` (``K = M + L``), LayerNorm without gain or
  bias, and the relative attention of :mod:`.attention`, causal over ``[m; z]``. In
  pre-LN the FFN residual adds the normalized ``LN(y)``, as the reference does.
  ``W_qkv, W_r, W_o, W₁, W₂`` are weight-normalized.
* **Once per forward pass** (:meth:`DEQTransformerCell.prepare`): the normalized
  weights, every dropout mask (attention output and both FFN layers per (sample,
  channel), attention probabilities in full, positional features per channel), the
  positional keys ``r`` and the memory's keys and values (the memory does not change
  during the solve). Every solver iteration and the backward pass see these arrays.
* **Equilibrium** — ``z* = f(z*)`` from ``z₀ = 0`` by :class:`jdeq.nn.DEQ` (Anderson
  forward, implicit gradient with Broyden backward). In training the loss reads
  ``f(z*)`` — one more application of the cell, as the reference does to attach its
  backward hook; with the implicit gradient of ``z*`` this gives exactly the
  reference's gradient ``(∂f/∂θ)ᵀ (I − Jᵀ)⁻¹ ḡ``. Evaluation reads ``z*``. The
  pretraining mode backpropagates through ``unrolled_steps`` (2) plain applications.
* **Output** — the states, with locked dropout per (sample, position) (the
  reference's output mask, whose shape broadcasts over the features), read by the
  adaptive softmax (:meth:`DEQTransformerLM.token_log_probs`).
* **Memory** — the last ``M`` positions of ``[m; f(z*)]`` (``z*`` in evaluation) and
  of ``ũ``, stop-gradient, as the reference stores them. Shapes are static: the
  memory always has ``M`` slots and a validity mask, invalid slots are masked out of
  the attention, so the first segment (all slots invalid) is the same compiled
  program and computes exactly what a model without memory computes.

Initialisation as in the reference: embeddings, projections, the injection,
``r_w``/``r_r`` and the cluster weights ``N(0, 0.01²)``; biases 0; the
weight-normalized kernels keep PyTorch's default ``U(±1/√fan_in)`` (the reference's
re-initialisation does not reach them), with gains ``g = ‖v‖``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

import jdeq
from jdeq import (AbstractSolver, GradientMode, config, nn, require, require_positive)
from jdeq.models.deq_transformer import attention
from jdeq.models.deq_transformer.adaptive import AdaptiveVocabulary, cluster_widths
from jdeq.models.mdeq import TORCH_DEFAULT
from jdeq.models.registry import ModelConfig

#: ``F.layer_norm``'s default epsilon, the reference's LayerNorm (no gain, no bias).
LAYER_NORM_EPSILON = 1e-5


class Memory(NamedTuple):
  """The segment memory: a pytree with a leading batch axis on every leaf.

  Attributes:
    hidden: ``(B, M, d_model)`` the states of the last ``M`` positions.
    injection: ``(B, M, 3·n_head·d_head)`` their injections ``u``.
    valid: ``(B, M)`` float32, 1 where a slot holds a real position.
  """
  hidden: jax.Array
  injection: jax.Array
  valid: jax.Array


class LMAux(NamedTuple):
  """Auxiliary outputs of :class:`DEQTransformerLM`.

  Attributes:
    stats: the forward :class:`jdeq.SolverStats`, per sample.
    jac_loss: ``(B,)`` Hutchinson estimate of ``‖J_f(z*)‖²_F / (L·d)`` (zeros
      without probes).
    memory: the :class:`Memory` for the next segment (stop-gradient).
  """
  stats: jdeq.SolverStats
  jac_loss: jax.Array
  memory: Memory


class CellInput(NamedTuple):
  """What the cell reads besides its state: the injection pytree of the solve.

  Attributes:
    injection: ``(B, M + L, 3·H·D)`` ``[u_memory; u]``.
    memory: ``(B, M, d_model)`` memory states (stop-gradient).
    memory_valid: ``(B, M)`` validity of the memory slots.
  """
  injection: jax.Array
  memory: jax.Array
  memory_valid: jax.Array


def layer_norm(x: jax.Array, epsilon: float = LAYER_NORM_EPSILON) -> jax.Array:
  """LayerNorm over the last axis without gain or bias."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
  return centered * jax.lax.rsqrt(var + epsilon)


def _dense(layer: nnx.Module, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
  """``x @ kernel + bias`` of a (weight-normalized) Linear with a prepared kernel.

  Same as :func:`jdeq.nn.apply_layer`, written out: the cell runs inside every
  solver iteration, and a functional copy of the layer per call costs trace time.
  """
  inner = layer.layer if isinstance(layer, nn.WeightNorm) else layer
  y = x @ (inner.kernel[...] if kernel is None else kernel)
  return y if inner.bias is None else y + inner.bias[...]


def _normal(std: float):
  return nnx.initializers.normal(std)


def _default_solver() -> AbstractSolver:
  return jdeq.Anderson(max_iter=30, tol=1e-3, stop_mode="rel", m=6)


def _default_grad() -> GradientMode:
  return jdeq.IFT(jdeq.Broyden(max_iter=36, tol=1e-3, stop_mode="rel", memory=35))


@config
class DEQTransformerConfig(ModelConfig):
  """A DEQ-Transformer language model.

  Attributes:
    vocab_size: ``V``, ids ``[0, V)`` sorted by decreasing frequency.
    d_model: model width ``d`` (even: sinusoidal positions).
    n_head, d_head: attention heads ``H`` and their width ``D``.
    d_inner: hidden width of the FFN.
    d_embed: width of the head cluster's embedding (None: ``d_model``).
    tgt_len: segment length ``L`` the model is trained on (the data side's setting;
      the model accepts any length).
    mem_len: memory slots ``M`` (0: no memory).
    pre_ln: pre-LN cell instead of post-LN.
    dropout: rate of every locked dropout but the attention's (input, output,
      attention output, FFN, positional features).
    dropatt: rate of the attention-probability dropout.
    weight_norm: weight-normalize ``W_qkv, W_r, W_o, W₁, W₂``.
    cutoffs: adaptive softmax cutoffs (empty: one cluster, a plain softmax).
    div_val: width divisor between clusters.
    tie_weights: tie the softmax weights to the embedding tables.
    tie_projs: per cluster, tie the softmax projection to the embedding's (None:
      the reference's choice, all but the head cluster's when there are cutoffs).
    init_std, proj_init_std: standard deviations of the normal initialisations.
    unrolled_steps: plain applications of the cell in the pretraining mode.
    solver, eval_solver, grad: as for :class:`jdeq.nn.DEQ`.
  """
  vocab_size: int = 33_278
  d_model: int = 128
  n_head: int = 4
  d_head: int = 32
  d_inner: int = 512
  d_embed: Optional[int] = None
  tgt_len: int = 64
  mem_len: int = 64
  pre_ln: bool = False
  dropout: float = 0.0
  dropatt: float = 0.0
  weight_norm: bool = True
  cutoffs: tuple[int, ...] = ()
  div_val: int = 1
  tie_weights: bool = True
  tie_projs: Optional[tuple[bool, ...]] = None
  init_std: float = 0.01
  proj_init_std: float = 0.01
  unrolled_steps: int = 2
  solver: AbstractSolver = _default_solver()
  eval_solver: AbstractSolver = _default_solver()
  grad: GradientMode = _default_grad()

  def __post_init__(self) -> None:
    object.__setattr__(self, "cutoffs", tuple(int(c) for c in self.cutoffs))
    if self.tie_projs is not None:
      object.__setattr__(self, "tie_projs", tuple(bool(t) for t in self.tie_projs))
    require_positive(self, vocab_size=self.vocab_size, d_model=self.d_model,
                     n_head=self.n_head, d_head=self.d_head, d_inner=self.d_inner,
                     tgt_len=self.tgt_len, div_val=self.div_val,
                     unrolled_steps=self.unrolled_steps, init_std=self.init_std,
                     proj_init_std=self.proj_init_std)
    require(self.d_model % 2 == 0, self,
            f"d_model must be even (sinusoidal positions), got {self.d_model}")
    require(self.d_embed is None or self.d_embed > 0, self,
            f"d_embed must be > 0 or None, got {self.d_embed!r}")
    require(isinstance(self.mem_len, int) and self.mem_len >= 0, self,
            f"mem_len must be an integer >= 0, got {self.mem_len!r}")
    edges = (0, *self.cutoffs, self.vocab_size)
    require(all(a < b for a, b in zip(edges, edges[1:])), self,
            f"cutoffs must increase strictly within (0, vocab_size={self.vocab_size}), "
            f"got {self.cutoffs}")
    widths = cluster_widths(self.embed_width, len(self.cutoffs) + 1, self.div_val)
    require(min(widths) >= 1, self,
            f"div_val={self.div_val} leaves a cluster without embedding width "
            f"(widths {widths})")
    require(self.tie_projs is None or len(self.tie_projs) == len(self.cutoffs) + 1,
            self, f"tie_projs needs one flag per cluster ({len(self.cutoffs) + 1}), "
            f"got {self.tie_projs}")
    for name, rate in (("dropout", self.dropout), ("dropatt", self.dropatt)):
      require(0.0 <= rate < 1.0, self, f"{name} must be in [0, 1), got {rate!r}")
    for name, value in (("solver", self.solver), ("eval_solver", self.eval_solver)):
      require(isinstance(value, AbstractSolver), self,
              f"{name} must be a fixed-point solver, got {value!r}")

  @property
  def embed_width(self) -> int:
    """``d_embed``, defaulting to ``d_model``."""
    return self.d_model if self.d_embed is None else self.d_embed

  @property
  def projection_ties(self) -> tuple[bool, ...]:
    """The per-cluster projection ties in effect."""
    if self.tie_projs is not None:
      return self.tie_projs
    return (False,) + (True,) * len(self.cutoffs)

  @property
  def attention_width(self) -> int:
    """``n_head · d_head``."""
    return self.n_head * self.d_head

  @property
  def uses_dropout(self) -> bool:
    """Whether a training pass draws any dropout mask."""
    return self.dropout > 0 or self.dropatt > 0

  def build(self, *, rngs: nnx.Rngs) -> "DEQTransformerLM":
    return DEQTransformerLM(self, rngs=rngs)


class DEQTransformerCell(nn.EquilibriumCell):
  """The weight-tied Transformer-XL layer ``f(z; ũ, m)`` (see the module docstring).

  The state is ``z`` ``(B, L, d_model)``; the injection is a :class:`CellInput`.

  Attributes:
    qkv, r_net, o_net, ff1, ff2: the linear maps (weight-normalized when
      configured); ``qkv`` and ``r_net`` have no bias.
    r_w_bias, r_r_bias: ``(H, D)`` content and position biases.
  """

  def __init__(self, cfg: DEQTransformerConfig, *, rngs: nnx.Rngs):
    d, width, inner = cfg.d_model, cfg.attention_width, cfg.d_inner
    self.d_model = d
    self.n_head = cfg.n_head
    self.d_head = cfg.d_head
    self.d_inner = inner
    self.pre_ln = cfg.pre_ln
    self.dropout = cfg.dropout
    self.dropatt = cfg.dropatt
    kernel_init = TORCH_DEFAULT if cfg.weight_norm else _normal(cfg.init_std)

    def linear(fan_in, fan_out, bias):
      layer = nnx.Linear(fan_in, fan_out, use_bias=bias, kernel_init=kernel_init,
                         bias_init=nnx.initializers.zeros, rngs=rngs)
      return nn.WeightNorm(layer) if cfg.weight_norm else layer

    self.qkv = linear(d, 3 * width, False)
    self.r_net = linear(d, width, False)
    self.r_w_bias = nnx.Param(_normal(cfg.init_std)(rngs.params(), (cfg.n_head, cfg.d_head)))
    self.r_r_bias = nnx.Param(_normal(cfg.init_std)(rngs.params(), (cfg.n_head, cfg.d_head)))
    self.o_net = linear(width, d, True)
    self.ff1 = linear(d, inner, True)
    self.ff2 = linear(inner, d, True)

  def initial_state(self, injection: CellInput) -> jax.Array:
    batch, positions = injection.injection.shape[:2]
    length = positions - injection.memory.shape[1]
    return jnp.zeros((batch, length, self.d_model), injection.injection.dtype)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.n_head, self.d_head)

  def prepare(self, injection: CellInput, *, train: bool,
              key: Optional[jax.Array]) -> dict:
    """Weights, dropout masks, positional keys and memory keys/values of one pass."""
    batch, key_len = injection.injection.shape[:2]
    mem_len = injection.memory.shape[1]
    length = key_len - mem_len
    dtype = injection.injection.dtype
    weights = {name: nn.effective_weight(getattr(self, name), train=train)
               for name in ("qkv", "r_net", "o_net", "ff1", "ff2")}
    masks = dict(attn_out=None, ff1=None, ff2=None, attn=None)
    positions = attention.sinusoid_embedding(attention.relative_distances(key_len, dtype),
                                             self.d_model)
    if train and (self.dropout > 0 or self.dropatt > 0):
      if key is None:
        raise ValueError("DEQTransformerCell: training with dropout needs a dropout key")
      k_pos, k_out, k_ff1, k_ff2, k_att = jax.random.split(key, 5)
      if self.dropout > 0:
        mask = lambda k, n: nn.variational_dropout_mask(k, batch, n, self.dropout,
                                                        spatial_dims=1, dtype=dtype)
        masks.update(attn_out=mask(k_out, self.d_model), ff1=mask(k_ff1, self.d_inner),
                     ff2=mask(k_ff2, self.d_model))
        # One mask per feature of the positional embedding, shared by the batch.
        positions = positions * nn.variational_dropout_mask(
            k_pos, 1, self.d_model, self.dropout, spatial_dims=0, dtype=dtype)
      if self.dropatt > 0:
        keep = jax.random.bernoulli(k_att, 1.0 - self.dropatt,
                                    (batch, self.n_head, length, key_len))
        masks["attn"] = keep.astype(dtype) / jnp.asarray(1.0 - self.dropatt, dtype)
    r = self._heads(_dense(self.r_net, positions, weights["r_net"]))
    memory = layer_norm(injection.memory) if self.pre_ln else injection.memory
    memory_heads = (_dense(self.qkv, memory, weights["qkv"])
                    + injection.injection[:, :mem_len])
    _, memory_k, memory_v = jnp.split(memory_heads, 3, axis=-1)
    return dict(weights=weights, masks=masks, r=r, memory_k=self._heads(memory_k),
                memory_v=self._heads(memory_v))

  def __call__(self, z: jax.Array, injection: CellInput, prepared: dict) -> jax.Array:
    weights, masks = prepared["weights"], prepared["masks"]
    batch, length = z.shape[:2]
    mem_len = injection.memory.shape[1]
    x = layer_norm(z) if self.pre_ln else z
    heads = _dense(self.qkv, x, weights["qkv"]) + injection.injection[:, mem_len:]
    q, k, v = (self._heads(h) for h in jnp.split(heads, 3, axis=-1))
    k = jnp.concatenate([prepared["memory_k"], k], axis=1)
    v = jnp.concatenate([prepared["memory_v"], v], axis=1)
    key_valid = jnp.concatenate(
        [injection.memory_valid.astype(z.dtype), jnp.ones((batch, length), z.dtype)],
        axis=1)
    attended = attention.relative_attention(q, k, v, prepared["r"], self.r_w_bias[...],
                                            self.r_r_bias[...], key_valid, masks["attn"])
    out = _dense(self.o_net, attended.reshape(batch, length, -1), weights["o_net"])
    if masks["attn_out"] is not None:
      out = out * masks["attn_out"]
    # Post-LN normalizes z + a before the FFN, pre-LN normalizes it as the FFN's
    # input: either way the FFN and its residual read x = LN(z + a).
    x = layer_norm(z + out)
    hidden = jax.nn.relu(_dense(self.ff1, x, weights["ff1"]))
    if masks["ff1"] is not None:
      hidden = hidden * masks["ff1"]
    hidden = _dense(self.ff2, hidden, weights["ff2"])
    if masks["ff2"] is not None:
      hidden = hidden * masks["ff2"]
    if self.pre_ln:
      return x + hidden
    return layer_norm(x + hidden)


class DEQTransformerLM(nnx.Module):
  """The DEQ-Transformer language model: tokens and memory → the states the softmax reads.

  Called as ``hidden, aux = model(tokens, memory=memory, train=, unrolled=,
  budget=, jac_probes=)``; ``model.token_log_probs(hidden, targets)`` scores the
  targets and ``aux.memory`` is the next segment's memory.

  The model does not subclass :class:`jdeq.nn.DEQNetwork`, whose contract is
  ``head(z*)`` of one input: this model takes and returns a segment memory, the
  memory and the injection reach the cell together (so the implicit gradient flows
  to ``u`` while the stop-gradient memory stays an input), training reads ``f(z*)``
  instead of ``z*``, and its output is the states rather than logits (a
  ``(B, L, V)`` logit tensor is too large for WikiText-103's vocabulary; the
  adaptive softmax scores only the targets). It reuses :class:`jdeq.nn.DEQ` for the
  solve, and draws its keys the way :meth:`jdeq.nn.DEQ.call_with_rngs` does: the
  ``dropout`` stream only when training with dropout, the ``jacobian`` stream only
  when probes are requested.

  Attributes:
    config: the :class:`DEQTransformerConfig`.
    vocab: the tied :class:`AdaptiveVocabulary` (embedding and softmax).
    injection: ``Linear(d_model → 3·H·D)`` with bias, the input injection.
    deq: the :class:`jdeq.nn.DEQ` around the :class:`DEQTransformerCell`.
    rngs: the model's RNG streams (``"dropout"``, ``"jacobian"``).
  """

  def __init__(self, config: DEQTransformerConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    self.vocab = AdaptiveVocabulary(
        cfg.vocab_size, cfg.embed_width, cfg.d_model, cfg.cutoffs, div_val=cfg.div_val,
        tie_weights=cfg.tie_weights, tie_projs=cfg.projection_ties,
        init_std=cfg.init_std, proj_init_std=cfg.proj_init_std, rngs=rngs)
    self.injection = nnx.Linear(cfg.d_model, 3 * cfg.attention_width,
                                kernel_init=_normal(cfg.init_std),
                                bias_init=nnx.initializers.zeros, rngs=rngs)
    self.deq = nn.DEQ(DEQTransformerCell(cfg, rngs=rngs), solver=cfg.solver,
                      eval_solver=cfg.eval_solver, grad=cfg.grad,
                      unrolled_steps=cfg.unrolled_steps)
    self.rngs = rngs

  # -- memory ---------------------------------------------------------------------
  def _dtype(self):
    return self.injection.kernel[...].dtype

  def init_memory(self, batch_size: int) -> Memory:
    """The empty memory of ``batch_size`` rows (every slot invalid)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
      raise ValueError(f"init_memory: batch_size must be an integer >= 1, got "
                       f"{batch_size!r}")
    cfg, dtype = self.config, self._dtype()
    return Memory(
        hidden=jnp.zeros((batch_size, cfg.mem_len, cfg.d_model), dtype),
        injection=jnp.zeros((batch_size, cfg.mem_len, 3 * cfg.attention_width), dtype),
        valid=jnp.zeros((batch_size, cfg.mem_len), jnp.float32))

  def reset_memory(self, memory: Memory, reset: jax.Array) -> Memory:
    """Clears the rows of ``memory`` where ``reset`` ``(B,)`` is 1 (a traced select)."""
    self._check_memory(memory, None)
    reset = jnp.asarray(reset)
    if reset.shape != memory.valid.shape[:1]:
      raise ValueError(f"reset_memory: reset must have shape (B,) = "
                       f"{memory.valid.shape[:1]}, got {reset.shape}")
    clear = reset.astype(bool) if reset.dtype == bool else reset != 0
    return jax.tree.map(
        lambda leaf: jnp.where(clear.reshape((-1,) + (1,) * (leaf.ndim - 1)),
                               jnp.zeros((), leaf.dtype), leaf), memory)

  def _check_memory(self, memory: Memory, batch: Optional[int]) -> None:
    cfg = self.config
    if not isinstance(memory, Memory):
      raise ValueError(f"DEQTransformerLM: memory must be a Memory (see init_memory), "
                       f"got {type(memory).__name__}")
    batch = memory.hidden.shape[0] if batch is None else batch
    expected = dict(hidden=(batch, cfg.mem_len, cfg.d_model),
                    injection=(batch, cfg.mem_len, 3 * cfg.attention_width),
                    valid=(batch, cfg.mem_len))
    for name, shape in expected.items():
      got = tuple(getattr(memory, name).shape)
      if got != shape:
        raise ValueError(f"DEQTransformerLM: memory.{name} must have shape {shape} "
                         f"(batch {batch}, mem_len {cfg.mem_len}), got {got}")

  def _check_tokens(self, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"DEQTransformerLM: tokens must have shape (B, L) with L >= 1, "
                       f"got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"DEQTransformerLM: tokens must be integer ids, got dtype "
                       f"{tokens.dtype}")

  # -- forward --------------------------------------------------------------------
  def __call__(self, tokens: jax.Array, *, memory: Memory, train: bool = True,
               unrolled: bool = False, budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, LMAux]:
    """One segment: ``tokens`` int ``(B, L)`` → ``(hidden (B, L, d_model), LMAux)``.

    Args:
      tokens: the segment's token ids.
      memory: the :class:`Memory` of the previous segment (:meth:`init_memory` for
        the first); stop-gradient.
      train: training mode (dropout, the training solver and gradient, ``f(z*)``);
        else evaluation (the evaluation solver, ``z*``).
      unrolled: pretraining mode (backpropagate through ``unrolled_steps``
        applications of the cell from 0).
      budget: optional traced forward budget ``<= solver.max_iter``.
      jac_probes: static number of Hutchinson probes for ``aux.jac_loss``.
    """
    tokens = jnp.asarray(tokens)
    self._check_tokens(tokens)
    self._check_memory(memory, tokens.shape[0])
    dropout_key = self.rngs.dropout() if train and self.config.uses_dropout else None
    jacobian_key = self.rngs.jacobian() if jac_probes else None
    return self.forward(tokens, memory, train=train, unrolled=unrolled, budget=budget,
                        jac_probes=jac_probes, dropout_key=dropout_key,
                        jacobian_key=jacobian_key)

  def forward(self, tokens: jax.Array, memory: Memory, *, train: bool, unrolled: bool,
              budget: Optional[jax.Array], jac_probes: int,
              dropout_key: Optional[jax.Array],
              jacobian_key: Optional[jax.Array]) -> tuple[jax.Array, LMAux]:
    """:meth:`__call__` with explicit keys (dropout: needed when training with dropout)."""
    self._check_tokens(tokens)
    self._check_memory(memory, tokens.shape[0])
    cfg = self.config
    batch, length = tokens.shape
    io_dropout = train and cfg.dropout > 0
    cell_key = input_key = output_key = None
    if train and cfg.uses_dropout:
      if dropout_key is None:
        raise ValueError("DEQTransformerLM: training with dropout needs a dropout key")
      cell_key, input_key, output_key = jax.random.split(dropout_key, 3)
    memory = jax.tree.map(jax.lax.stop_gradient, memory)
    embedded = self.vocab.embed(tokens)
    if io_dropout:
      embedded = embedded * nn.variational_dropout_mask(
          input_key, batch, cfg.d_model, cfg.dropout, spatial_dims=1,
          dtype=embedded.dtype)
    u = self.injection(embedded)
    inputs = CellInput(injection=jnp.concatenate([memory.injection, u], axis=1),
                       memory=memory.hidden, memory_valid=memory.valid)
    z_star, aux = self.deq(inputs, train=train, unrolled=unrolled, budget=budget,
                           jac_probes=jac_probes, dropout_key=cell_key,
                           jacobian_key=jacobian_key)
    if train and not unrolled:
      cell = self.deq.cell
      # prepare is deterministic in its key: these are the solve's very arrays.
      hidden = cell(z_star, inputs, cell.prepare(inputs, train=True, key=cell_key))
    else:
      hidden = z_star
    next_memory = _next_memory(memory, hidden, inputs.injection, cfg.mem_len)
    if io_dropout:
      # The reference's output mask is drawn per (sample, position) and broadcast
      # over the features.
      hidden = hidden * nn.variational_dropout_mask(
          output_key, batch, length, cfg.dropout, spatial_dims=0,
          dtype=hidden.dtype)[..., None]
    return hidden, LMAux(aux.stats, aux.jac_loss, next_memory)

  # -- softmax --------------------------------------------------------------------
  def token_log_probs(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """``(B, L)`` float32 ``log p(target | context)`` from the states ``hidden``."""
    if hidden.shape[:-1] != targets.shape:
      raise ValueError(f"token_log_probs: targets must have shape {hidden.shape[:-1]}, "
                       f"got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(f"token_log_probs: targets must be integer ids, got dtype "
                       f"{targets.dtype}")
    log_probs = self.vocab.token_log_probs(hidden, targets)
    return log_probs.astype(jnp.promote_types(log_probs.dtype, jnp.float32))

  def log_probs(self, hidden: jax.Array) -> jax.Array:
    """``(B, L, V)`` full log-distribution (for tests and small vocabularies)."""
    return self.vocab.log_probs(hidden)


def _next_memory(memory: Memory, hidden: jax.Array, injection: jax.Array,
                 mem_len: int) -> Memory:
  """The last ``mem_len`` positions of ``[memory; segment]``, stop-gradient."""
  batch, length = hidden.shape[:2]

  def last(x):
    return jax.lax.stop_gradient(x[:, x.shape[1] - mem_len:])

  valid = jnp.concatenate([memory.valid, jnp.ones((batch, length), memory.valid.dtype)],
                          axis=1)
  return Memory(hidden=last(jnp.concatenate([memory.hidden, hidden], axis=1)),
                injection=last(injection), valid=last(valid))

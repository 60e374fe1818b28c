"""A tiny model and synthetic data honouring the model and data contracts.

For tests and smoke runs of the training machinery (in the spirit of
``tfds.testing``): the loop, checkpoints and sharding only rely on the contracts, so
they can be exercised in seconds without the real models or datasets.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdeq
from jdeq.nn import DEQAux


class TinyDEQClassifier(nnx.Module):
  """``z* = tanh(W z + U x + b)`` on flattened images, then a linear classifier.

  Implements the model contract (:class:`jdeq.nn.EquilibriumModel`) directly on
  :func:`jdeq.fixed_point`, without the library's layers: dropout on the injection
  in training and the Hutchinson penalty drawn from the model's own ``"jacobian"``
  RNG stream.
  """

  def __init__(self, image_shape: tuple[int, ...], num_classes: int, *,
               width: int = 16, dropout: float = 0.1, max_iter: int = 12,
               rngs: nnx.Rngs):
    in_features = int(np.prod(image_shape))
    self.embed = nnx.Linear(in_features, width, rngs=rngs)
    self.cell = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                           kernel_init=nnx.initializers.normal(0.3 / np.sqrt(width)))
    self.head = nnx.Linear(width, num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.rngs = rngs
    self.solver = jdeq.Anderson(max_iter=max_iter, tol=1e-4)
    self.eval_solver = jdeq.Anderson(max_iter=max_iter + 2, tol=1e-4)

  def __call__(self, images: jax.Array, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, DEQAux]:
    injection = self.embed(images.reshape(images.shape[0], -1))
    injection = self.dropout(injection, deterministic=not train)
    kernel = self.cell.kernel[...]

    def cell(z, kernel, injection):
      return jnp.tanh(z @ kernel + injection)

    z0 = jnp.zeros_like(injection)
    grad = jdeq.Unrolled(steps=6) if unrolled else jdeq.IFT()
    solver = self.solver if train else self.eval_solver
    z_star, stats = jdeq.fixed_point(cell, z0, kernel, injection, solver=solver,
                                     grad=grad, budget=budget)
    if jac_probes > 0:
      jac_loss = jdeq.jacobian_fro_sq(cell, z_star, kernel, injection,
                                      key=self.rngs.jacobian(),
                                      num_probes=jac_probes)
    else:
      jac_loss = jnp.zeros(z_star.shape[:1], jnp.float32)
    return self.head(z_star), DEQAux(stats, jac_loss)


def synthetic_dataset(num: int, image_shape=(4, 4, 1), num_classes: int = 3,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A learnable classification set: the label is the argmax of fixed projections."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num,) + tuple(image_shape)).astype(np.float32)
  projections = rng.normal(size=(int(np.prod(image_shape)), num_classes))
  labels = np.argmax(images.reshape(num, -1) @ projections, -1).astype(np.int32)
  return images, labels


def in_memory_train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                            *, seed: int = 0, start_step: int = 0) -> Iterator[dict]:
  """Batches following the data contract: batch ``k`` depends on ``(seed, k)`` only.

  Epoch ``e`` is a permutation drawn from ``(seed, e)``; the remainder is dropped.
  """
  per_epoch = len(images) // batch_size
  step = start_step
  while True:
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    index = order[position * batch_size:(position + 1) * batch_size]
    yield {"image": images[index], "label": labels[index]}
    step += 1


def in_memory_eval_batches(images: np.ndarray, labels: np.ndarray,
                           batch_size: int) -> Iterator[dict]:
  """One pass with static shapes; the last batch is padded and carries a mask."""
  for start in range(0, len(images), batch_size):
    image, label = images[start:start + batch_size], labels[start:start + batch_size]
    real = len(image)
    pad = batch_size - real
    yield {"image": np.concatenate([image, np.zeros((pad,) + image.shape[1:],
                                                    image.dtype)]),
           "label": np.concatenate([label, np.zeros((pad,), label.dtype)]),
           "mask": np.concatenate([np.ones(real, np.float32),
                                   np.zeros(pad, np.float32)])}


class TinyMemory(NamedTuple):
  """The segment memory of :class:`TinyDEQLanguageModel`."""
  hidden: jax.Array  # (B, M, width): the previous positions' equilibria
  valid: jax.Array   # (B, M): 1 where a slot holds a real position


class TinyLMAux(NamedTuple):
  stats: jdeq.SolverStats
  jac_loss: jax.Array
  memory: TinyMemory


class TinyDEQLanguageModel(nnx.Module):
  """A segment-recurrent equilibrium LM honouring the language-modelling contract.

  ``z*_t = tanh(W z*_t + E[x_t] + m̄)`` at every position, where ``m̄`` is the mean
  of the valid memory slots (the last ``mem_len`` equilibria, stop-gradient), then
  tied logits ``z*_t · Eᵀ``. Small enough for tests of the training machinery
  (:class:`jdeq.train.LanguageModeling`): the memory makes each segment depend on
  the ones before it, so a carry that is lost or replayed changes the loss.
  """

  def __init__(self, vocab_size: int, *, width: int = 16, mem_len: int = 4,
               max_iter: int = 12, solver: Optional[jdeq.Anderson] = None,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
    self.cell = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                           kernel_init=nnx.initializers.normal(0.3 / np.sqrt(width)))
    self.rngs = rngs
    self.width, self.mem_len = width, mem_len
    # ``solver`` replaces the default (e.g. one that records residual traces).
    self.solver = solver or jdeq.Anderson(max_iter=max_iter, tol=1e-4)

  def init_memory(self, batch_size: int) -> TinyMemory:
    return TinyMemory(jnp.zeros((batch_size, self.mem_len, self.width)),
                      jnp.zeros((batch_size, self.mem_len)))

  def reset_memory(self, memory: TinyMemory, reset: jax.Array) -> TinyMemory:
    keep = (1.0 - reset.astype(jnp.float32))[:, None]
    return TinyMemory(memory.hidden * keep[..., None], memory.valid * keep)

  def __call__(self, tokens: jax.Array, *, memory: TinyMemory, train: bool = True,
               unrolled: bool = False, budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, TinyLMAux]:
    del train
    count = jnp.maximum(jnp.sum(memory.valid, -1, keepdims=True), 1.0)
    context = jnp.sum(memory.hidden * memory.valid[..., None], 1) / count
    injection = self.embed(tokens) + context[:, None, :]
    kernel = self.cell.kernel[...]

    def cell(z, kernel, injection):
      return jnp.tanh(z @ kernel + injection)

    grad = jdeq.Unrolled(steps=4) if unrolled else jdeq.IFT()
    z_star, stats = jdeq.fixed_point(cell, jnp.zeros_like(injection), kernel,
                                     injection, solver=self.solver, grad=grad,
                                     budget=budget)
    if jac_probes > 0:
      jac_loss = jdeq.jacobian_fro_sq(cell, z_star, kernel, injection,
                                      key=self.rngs.jacobian(),
                                      num_probes=jac_probes)
    else:
      jac_loss = jnp.zeros(z_star.shape[:1], jnp.float32)
    hidden = jnp.concatenate([memory.hidden, z_star], 1)[:, -self.mem_len:]
    valid = jnp.concatenate([memory.valid, jnp.ones(tokens.shape, jnp.float32)],
                            1)[:, -self.mem_len:]
    next_memory = TinyMemory(jax.lax.stop_gradient(hidden), valid)
    return z_star, TinyLMAux(stats, jac_loss, next_memory)

  def token_log_probs(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    logits = self.embed.attend(hidden)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


def token_stream(num_tokens: int, vocab_size: int, *, seed: int = 0) -> np.ndarray:
  """A learnable token stream: a random first-order Markov chain (int32)."""
  rng = np.random.default_rng(seed)
  transitions = rng.dirichlet(np.full(vocab_size, 0.1), size=vocab_size)
  tokens = np.empty(num_tokens, np.int32)
  tokens[0] = 0
  for t in range(1, num_tokens):
    tokens[t] = rng.choice(vocab_size, p=transitions[tokens[t - 1]])
  return tokens

"""What a training step computes from a batch: the task between model and loop.

The steps and the loop are written once for every task; a :class:`Task` says which
batch fields the model reads, how the model is called on them, which loss the
step minimizes and what state, if any, runs from one batch to the next (the
*carry*: a language model's segment memory).

* :class:`Classification` — ``{"image", "label"[, "mask"]}``, the model contract of
  :class:`jdeq.nn.EquilibriumModel`, the cross-entropy of the logits; no carry.
* :class:`LanguageModeling` — ``{"tokens", "targets", "reset"[, "mask"]}`` and a
  segment-recurrent model (Transformer-XL style) called as
  ``hidden, aux = model(tokens, memory=memory, train=, unrolled=, budget=,
  jac_probes=)`` with ``aux.memory`` the memory of the next segment and
  ``model.token_log_probs(hidden, targets)`` the log-likelihood of each target;
  the memory is the carry, cleared where ``reset`` is 1.

The carry of training lives in the train state (so checkpoints hold it and a
resumed run continues exactly); evaluation starts its own from the first batch of
each pass.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp

from jdeq.train import metrics as metrics_lib

Batch = Mapping[str, jax.Array]


class TaskOutput(NamedTuple):
  """One forward pass of a task.

  Attributes:
    loss_sum: summed loss over the weighted targets (float32 scalar).
    correct: summed correct predictions (0 where the task has no accuracy).
    weight: the number of weighted targets.
    aux: the model's auxiliary output (``aux.stats``, ``aux.jac_loss``).
    carry: the state for the next batch (None without one).
  """
  loss_sum: jax.Array
  correct: jax.Array
  weight: jax.Array
  aux: Any
  carry: Any


class Task(Protocol):
  """How a step turns a batch into a loss.

  Attributes:
    inputs: the batch fields the steps read (everything else stays on the host).
    unit: what a batch holds, for throughputs (``"images"``, ``"tokens"``).
    carries: whether the task has a carry (then :func:`jdeq.train.fit` starts it
      from the first training batch and keeps it in ``TrainState.carry``).
  """
  inputs: tuple[str, ...]
  unit: str
  carries: bool

  def init_carry(self, model: Any, batch: Mapping[str, Any]) -> Any:
    """The carry before the first batch of a run or an evaluation pass."""
    ...

  def forward(self, model: Any, batch: Batch, carry: Any, *, train: bool,
              unrolled: bool, budget: Optional[jax.Array],
              jac_probes: int) -> TaskOutput:
    """Calls the model on the batch and sums its loss."""
    ...

  def sample_mask(self, batch: Batch) -> jax.Array:
    """``(B,)`` weights of the batch's rows in the solver statistics."""
    ...

  def units(self, batch: Mapping[str, Any]) -> int:
    """Items of ``unit`` in a (host) batch."""
    ...

  def describe(self, summary: dict[str, float]) -> dict[str, float]:
    """The summary as the task reports it (e.g. perplexity for language models)."""
    ...


class Classification:
  """Image classification and segmentation: logits against integer labels."""

  inputs = ("image", "label", "mask")
  unit = "images"
  carries = False

  def init_carry(self, model: Any, batch: Mapping[str, Any]) -> None:
    del model, batch
    return None

  def forward(self, model, batch, carry, *, train, unrolled, budget, jac_probes):
    logits, aux = model(batch["image"], train=train, unrolled=unrolled,
                        budget=budget, jac_probes=jac_probes)
    loss_sum, correct, weight = metrics_lib.classification_sums(
        logits, batch["label"], batch.get("mask"))
    return TaskOutput(loss_sum, correct, weight, aux, carry)

  def sample_mask(self, batch):
    mask = batch.get("mask")
    return (jnp.ones(batch["label"].shape[:1], jnp.float32) if mask is None
            else mask.astype(jnp.float32))

  def units(self, batch) -> int:
    return len(batch["label"])

  def describe(self, summary):
    return summary

  def __repr__(self) -> str:
    return "Classification()"


class LanguageModeling:
  """Next-token prediction over fixed segments with a carried segment memory.

  The loss is the mean negative log-likelihood per (unmasked) target token; its
  exponential, the perplexity, is what the summaries report instead of an accuracy
  (an argmax over an adaptive softmax would need the full distribution every
  step). The memory is stop-gradient: it is a model input, not a path of the
  gradient, as in Transformer-XL.
  """

  inputs = ("tokens", "targets", "reset", "mask")
  unit = "tokens"
  carries = True

  def init_carry(self, model: Any, batch: Mapping[str, Any]) -> Any:
    return model.init_memory(len(batch["tokens"]))

  def forward(self, model, batch, carry, *, train, unrolled, budget, jac_probes):
    memory = model.reset_memory(carry, batch["reset"])
    hidden, aux = model(batch["tokens"], memory=memory, train=train,
                        unrolled=unrolled, budget=budget, jac_probes=jac_probes)
    log_probs = model.token_log_probs(hidden, batch["targets"])
    mask = batch.get("mask")
    weight = (jnp.ones(log_probs.shape, jnp.float32) if mask is None
              else mask.astype(jnp.float32))
    loss_sum = -jnp.sum(log_probs.astype(jnp.float32) * weight)
    next_memory = jax.tree.map(jax.lax.stop_gradient, aux.memory)
    return TaskOutput(loss_sum, jnp.zeros((), jnp.float32), jnp.sum(weight), aux,
                      next_memory)

  def sample_mask(self, batch):
    mask = batch.get("mask")
    rows = batch["tokens"].shape[:1]
    # A row of the padded last segment that holds no real token is padding too.
    return (jnp.ones(rows, jnp.float32) if mask is None
            else (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))

  def units(self, batch) -> int:
    mask = batch.get("mask")
    return int(batch["tokens"].size if mask is None else mask.sum())

  def describe(self, summary):
    summary = dict(summary)
    summary.pop("accuracy", None)
    # exp of a mean NLL past ~700 is inf; such a run has diverged anyway.
    summary["perplexity"] = math.exp(min(summary["loss"], 700.0))
    return summary

  def __repr__(self) -> str:
    return "LanguageModeling()"

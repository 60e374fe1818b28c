"""Losses and the metric pytrees returned by the jitted steps.

Metrics stay on the device as sums between log intervals (adding two pytrees is an
asynchronous dispatch); the host reads them only when it logs, which keeps the
accelerator from waiting on Python.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jdeq import SolverStats


def classification_sums(logits: jax.Array, labels: jax.Array,
                        sample_mask: Optional[jax.Array] = None):
  """Summed cross-entropy, correct count and weight over the valid targets.

  Works for image labels ``(B,)`` with logits ``(B, K)`` and for segmentation labels
  ``(B, H, W)`` with logits ``(B, H, W, K)``. A target outside ``[0, K)`` (e.g. the
  Cityscapes ignore label 255) has weight 0, as does every target of a padded sample
  (``sample_mask == 0``).

  Returns:
    ``(loss_sum, correct_sum, weight_sum)``, float32 scalars.
  """
  num_classes = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels of shape {labels.shape} do not match logits of shape "
                     f"{logits.shape} (expected labels {logits.shape[:-1]})")
  valid = (labels >= 0) & (labels < num_classes)
  weight = valid.astype(jnp.float32)
  if sample_mask is not None:
    weight = weight * sample_mask.reshape(
        sample_mask.shape + (1,) * (labels.ndim - 1)).astype(jnp.float32)
  safe_labels = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe_labels)
  correct = (jnp.argmax(logits, -1) == safe_labels).astype(jnp.float32)
  return (jnp.sum(losses * weight), jnp.sum(correct * weight), jnp.sum(weight))


class StepMetrics(NamedTuple):
  """One training step's scalars (float32). Summed over steps between logs.

  ``residual_max`` is the exception: accumulated with a maximum.
  """
  loss: jax.Array          # task loss (cross-entropy), without the Jacobian term
  accuracy: jax.Array
  jac_loss: jax.Array      # mean Hutchinson ‖J‖²_F/d (0 on unregularized steps)
  regularized: jax.Array   # 1 if the step carried the Jacobian term
  gamma: jax.Array         # γ(t) of the schedule
  fwd_nfe: jax.Array       # mean forward map evaluations per sample
  residual: jax.Array      # mean relative residual at z*
  residual_max: jax.Array  # largest relative residual in the batch
  converged: jax.Array     # fraction of samples that reached the tolerance
  nonfinite: jax.Array     # 1 if the step was skipped (non-finite input, loss or
                           # gradient); such a step has every other field 0
  count: jax.Array         # 1 per applied step, so sums turn into means


def solver_summary(stats: SolverStats, sample_mask: Optional[jax.Array] = None):
  """(nfe_sum, residual_sum, residual_max, converged_sum, count) over samples."""
  weight = (jnp.ones(stats.nstep.shape, jnp.float32) if sample_mask is None
            else sample_mask.astype(jnp.float32))
  residual = jnp.where(jnp.isfinite(stats.rel_residual), stats.rel_residual,
                       jnp.inf).astype(jnp.float32)
  return (jnp.sum(stats.nstep.astype(jnp.float32) * weight),
          jnp.sum(jnp.where(weight > 0, residual, 0.0)),
          jnp.max(jnp.where(weight > 0, residual, -jnp.inf)),
          jnp.sum(stats.converged.astype(jnp.float32) * weight),
          jnp.sum(weight))


class EvalSums(NamedTuple):
  """Masked sums over an evaluation pass; padding contributes nothing."""
  loss: jax.Array
  correct: jax.Array
  weight: jax.Array        # valid targets (samples, or pixels for segmentation)
  samples: jax.Array       # real samples
  fwd_nfe: jax.Array
  residual: jax.Array
  residual_max: jax.Array
  converged: jax.Array


_MAX_FIELDS = ("residual_max",)


def accumulate(total, new):
  """Adds two metric pytrees field by field (maximum for ``*_max`` fields)."""
  if total is None:
    return new
  return type(new)(*[
      jnp.maximum(a, b) if name in _MAX_FIELDS else a + b
      for name, a, b in zip(new._fields, total, new)])


def summarize_train(total: StepMetrics) -> dict[str, float]:
  """Means over the applied steps of a log interval, as Python floats (one host sync).

  Skipped (non-finite) steps are excluded from the means and counted in
  ``nonfinite_steps``.
  """
  host = jax.device_get(total)
  steps = max(float(host.count), 1.0)
  regularized = float(host.regularized)
  return {
      "loss": float(host.loss) / steps,
      "accuracy": float(host.accuracy) / steps,
      "jac_loss": float(host.jac_loss) / regularized if regularized else 0.0,
      "regularized_fraction": regularized / steps,
      "gamma": float(host.gamma) / steps,
      "fwd_nfe": float(host.fwd_nfe) / steps,
      "residual": float(host.residual) / steps,
      "residual_max": float(host.residual_max),
      "converged": float(host.converged) / steps,
      "nonfinite_steps": int(host.nonfinite),
  }


def summarize_eval(total: EvalSums) -> dict[str, float]:
  """Accuracy, loss and solver statistics of a finished evaluation pass."""
  host = jax.device_get(total)
  weight = max(float(host.weight), 1.0)
  samples = max(float(host.samples), 1.0)
  return {
      "loss": float(host.loss) / weight,
      "accuracy": float(host.correct) / weight,
      "samples": int(host.samples),
      "fwd_nfe": float(host.fwd_nfe) / samples,
      "residual": float(host.residual) / samples,
      "residual_max": float(host.residual_max),
      "converged": float(host.converged) / samples,
  }

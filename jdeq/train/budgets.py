"""How a trained equilibrium model behaves under hard-stopped forward budgets.

The Jacobian-regularization paper's Tables 2–3 compare models by accuracy when
the solver is stopped after ``k`` iterations, and by iterations needed to reach a
residual tolerance. Both come from evaluation passes with the model's traced
``budget`` argument (no recompilation per ``k``) and from the residual traces of
its evaluation solver.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdeq.train import metrics as metrics_lib
from jdeq.train.checkpoint import Checkpointer
from jdeq.train.state import TrainState, create_train_state
from jdeq.train.steps import evaluate_model


def _budget_eval_step():
  def eval_fn(state: TrainState, batch, budget):
    logits, aux, mask = evaluate_model(state, batch, budget)
    _, correct, weight = metrics_lib.classification_sums(logits, batch["label"], mask)
    return correct, weight, aux.stats.trace, aux.stats.nstep, mask

  return jax.jit(eval_fn)


def budget_sweep(state: TrainState, batches: Iterable[Mapping[str, np.ndarray]],
                 budgets: Sequence[int],
                 tolerances: Sequence[float] = (1e-2, 1e-3)) -> dict:
  """Accuracy at each hard-stopped budget and iterations to each tolerance.

  Args:
    state: a trained state whose model follows the model contract and whose
      evaluation solver records residual traces (``record_trace=True``) with a
      tolerance small enough to run the longest budget of interest.
    batches: evaluation batches (materialized once and reused for every budget).
    budgets: forward budgets ``k`` (map evaluations).
    tolerances: residual tolerances (in the solver's stop mode) for the
      iterations-to-tolerance statistics.

  Returns:
    ``{"accuracy": {k: acc}, "iterations_to_tolerance": {tol: {"mean", "median",
    "reached"}}, "mean_trace": [...]}``; iterations count map evaluations, and a
    sample that never reaches a tolerance within the trace counts as not reached
    (excluded from mean/median).
  """
  step = _budget_eval_step()
  batches = list(batches)
  accuracy = {}
  for k in budgets:
    correct = weight = 0.0
    for batch in batches:
      c, w, _, _, _ = step(state, batch, jnp.int32(k))
      correct += float(c)
      weight += float(w)
    accuracy[int(k)] = correct / max(weight, 1.0)
  # Iterations to tolerance come from a separate pass at the solver's own budget
  # (the traced budget is clipped to max_iter): a hard stop at the largest swept
  # budget would cap every count at that budget.
  traces, masks = [], []
  for batch in batches:
    _, _, trace, _, mask = step(state, batch, jnp.int32(np.iinfo(np.int32).max))
    traces.append(np.asarray(trace))
    masks.append(np.asarray(mask) > 0)
  trace = np.concatenate(traces)[np.concatenate(masks)]
  if trace.shape[1] == 0:
    raise ValueError("budget_sweep needs an evaluation solver with record_trace=True")
  reached = {}
  for tol in tolerances:
    below = trace <= tol
    hit = below.any(axis=1)
    first = np.argmax(below, axis=1) + 1
    reached[float(tol)] = dict(
        mean=float(first[hit].mean()) if hit.any() else None,
        median=float(np.median(first[hit])) if hit.any() else None,
        reached=float(hit.mean()))
  return dict(accuracy=accuracy, iterations_to_tolerance=reached,
              mean_trace=np.mean(trace, axis=0).tolist(),
              samples=int(trace.shape[0]))


def restore_state(model: nnx.Module, directory: str,
                  optimizer) -> Optional[TrainState]:
  """The latest checkpoint in ``directory`` loaded into ``model``'s structure.

  ``model`` may differ from the trained one in static settings (e.g. an evaluation
  solver that records traces) but not in its arrays; ``optimizer`` must be the
  run's (its state is part of the checkpoint). Returns None without a checkpoint.
  """
  checkpointer = Checkpointer(directory)
  try:
    if checkpointer.latest_step() is None:
      return None
    template = create_train_state(model, optimizer, seed=0)
    state, _ = checkpointer.restore(template)
    return state
  finally:
    checkpointer.close()

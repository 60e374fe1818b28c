"""How a trained equilibrium model behaves under hard-stopped forward budgets.

The Jacobian-regularization paper's Tables 2–3 compare models by accuracy when
the solver is stopped after ``k`` iterations, and by iterations needed to reach a
residual tolerance. Both come from evaluation passes with the model's traced
``budget`` argument (no recompilation per ``k``) and from the residual traces of
its evaluation solver.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdeq.train.checkpoint import Checkpointer
from jdeq.train.state import TrainState, create_train_state
from jdeq.train.tasks import Classification, Task


def _budget_eval_step(task: Task):
  def eval_fn(state: TrainState, batch, carry, budget):
    model = nnx.merge(state.graphdef, state.params, state.model_state, copy=True)
    out = task.forward(model, batch, carry, train=False, unrolled=False,
                       budget=budget, jac_probes=0)
    return (out.loss_sum, out.correct, out.weight, out.aux.stats.trace,
            task.sample_mask(batch), out.carry)

  return jax.jit(eval_fn)


def budget_sweep(state: TrainState, batches: Iterable[Mapping[str, np.ndarray]],
                 budgets: Sequence[int],
                 tolerances: Sequence[float] = (1e-2, 1e-3), *,
                 task: Task = Classification()) -> dict:
  """Quality at each hard-stopped budget and iterations to each tolerance.

  Every budget is one evaluation pass over ``batches`` in order, the task's carry
  (a language model's memory) threaded through it and started afresh per pass, so
  a hard stop at ``k`` also shapes the memory that later segments read.

  Args:
    state: a trained state whose model follows the model contract and whose
      evaluation solver records residual traces (``record_trace=True``) with a
      tolerance small enough to run the longest budget of interest.
    batches: evaluation batches (materialized once and reused for every budget).
    budgets: forward budgets ``k`` (map evaluations).
    tolerances: residual tolerances (in the solver's stop mode) for the
      iterations-to-tolerance statistics.
    task: what the model computes (:class:`~jdeq.train.tasks.Classification` or
      :class:`~jdeq.train.tasks.LanguageModeling`).

  Returns:
    ``{"loss": {k: mean loss}, <quality>: {k: value}, "iterations_to_tolerance":
    {tol: {"mean", "median", "reached"}}, "mean_trace": [...], "samples": n}``
    where ``<quality>`` is what the task reports (``"accuracy"``, or
    ``"perplexity"`` for language models); iterations count map evaluations, and
    a sample (a sequence row, for language models) that never reaches a tolerance
    within the trace counts as not reached (excluded from mean/median).
  """
  step = _budget_eval_step(task)
  batches = list(batches)
  model = nnx.merge(state.graphdef, state.params, state.model_state, copy=True)

  def run(budget):
    carry = task.init_carry(model, batches[0])
    loss = correct = weight = 0.0
    traces, masks = [], []
    for batch in batches:
      l, c, w, trace, mask, carry = step(state, batch, carry, jnp.int32(budget))
      loss, correct, weight = loss + float(l), correct + float(c), weight + float(w)
      traces.append(np.asarray(trace))
      masks.append(np.asarray(mask) > 0)
    weight = max(weight, 1.0)
    summary = task.describe({"loss": loss / weight, "accuracy": correct / weight})
    return summary, np.concatenate(traces)[np.concatenate(masks)]

  result: dict = {}
  for k in budgets:
    summary, _ = run(k)
    for name, value in summary.items():
      result.setdefault(name, {})[int(k)] = value
  # Iterations to tolerance come from a separate pass at the solver's own budget
  # (the traced budget is clipped to max_iter): a hard stop at the largest swept
  # budget would cap every count at that budget.
  _, trace = run(np.iinfo(np.int32).max)
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
  return dict(result, iterations_to_tolerance=reached,
              mean_trace=np.mean(trace, axis=0).tolist(),
              samples=int(trace.shape[0]))


def restore_state(model: nnx.Module, directory: str, optimizer, *,
                  carry: Any = None) -> Optional[TrainState]:
  """The latest checkpoint in ``directory`` loaded into ``model``'s structure.

  ``model`` may differ from the trained one in static settings (e.g. an evaluation
  solver that records traces) but not in its arrays; ``optimizer`` must be the
  run's (its state is part of the checkpoint), and ``carry`` a carry of the task's
  shapes where the task has one (``task.init_carry(model, batch)``). Returns None
  without a checkpoint.
  """
  checkpointer = Checkpointer(directory)
  try:
    if checkpointer.latest_step() is None:
      return None
    template = create_train_state(model, optimizer, seed=0, carry=carry)
    state, _ = checkpointer.restore(template)
    return state
  finally:
    checkpointer.close()

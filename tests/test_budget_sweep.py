"""Hard-stopped-budget evaluation of a trained state (jdeq.train.budget_sweep)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdeq
from jdeq import models
from jdeq.train import budget_sweep, create_train_state


def _state(record_trace=True):
  model = models.create(
      "mlp_deq_mnist", rngs=nnx.Rngs(0), width=16, hidden=32,
      eval_solver=jdeq.Anderson(max_iter=6, tol=1e-9, record_trace=record_trace))
  return create_train_state(model, optax.sgd(0.1), seed=0)


def _batches():
  rng = np.random.default_rng(0)
  return [dict(image=rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
               label=rng.integers(0, 10, 8).astype(np.int32),
               mask=np.array([1] * 6 + [0] * 2, np.float32))]


def test_accuracy_per_budget_and_iterations_to_tolerance():
  result = budget_sweep(_state(), _batches(), budgets=[1, 3, 6],
                        tolerances=(1e-1, 1e-12))
  assert sorted(result["accuracy"]) == [1, 3, 6]
  assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
  assert result["samples"] == 6  # padded samples excluded
  assert len(result["mean_trace"]) == 6
  assert np.all(np.diff(result["mean_trace"]) <= 1e-6) or result["mean_trace"][-1] < \
      result["mean_trace"][0]
  loose, tight = result["iterations_to_tolerance"].values()
  assert loose["reached"] > 0 and 1 <= loose["mean"] <= 6
  assert tight["reached"] == 0.0 and tight["mean"] is None


def test_needs_recorded_traces():
  with pytest.raises(ValueError, match="record_trace"):
    budget_sweep(_state(record_trace=False), _batches(), budgets=[2])


def test_iterations_to_tolerance_are_not_capped_by_the_swept_budgets():
  # Sweeping budgets 1..2 must not stop the traces at 2 evaluations: the counts
  # come from a pass at the solver's own max_iter (6).
  result = budget_sweep(_state(), _batches(), budgets=[1, 2], tolerances=(1e-1,))
  trace = result["mean_trace"]
  assert len(trace) == 6
  assert trace[5] < trace[1]

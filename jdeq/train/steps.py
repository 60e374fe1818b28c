"""The jitted train and evaluation steps.

The model is called through a :class:`~jdeq.train.tasks.Task` (by default
:class:`~jdeq.train.tasks.Classification`, the model contract
``logits, aux = model(images, train=..., unrolled=..., budget=..., jac_probes=...)``),
with ``aux.stats`` a :class:`jdeq.SolverStats` and ``aux.jac_loss`` a ``(B,)`` array.
A task with a carry (a language model's segment memory) keeps it in
``TrainState.carry`` across training steps and threads it through the evaluation
steps, which take and return it.

The loop compiles the unrolled ("pretraining") step and the equilibrium step, and
switches from the first to the second after ``pretrain_steps``. With Jacobian
regularization the equilibrium step comes in two compiled variants, with and
without the Hutchinson term, and the loop picks one per step from the decisions
``τ_t ~ Bernoulli(p)`` drawn for the whole run beforehand
(``JacobianSchedule.regularized_steps``). A single step that draws ``τ`` itself
and branches with ``lax.cond`` is available too (``regularized=None``), but XLA:CPU
runs the regularized branch of that conditional much slower than the same
computation compiled on its own (figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jdeq.train import metrics as metrics_lib
from jdeq.train import sharding as sharding_lib
from jdeq.train.regularization import JacobianSchedule
from jdeq.train.state import TrainState
from jdeq.train.tasks import Classification, Task

Batch = Mapping[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, metrics_lib.StepMetrics]]
EvalStep = Callable[[TrainState, Batch, Any], tuple[metrics_lib.EvalSums, Any]]


def _all_finite(tree: Any) -> jax.Array:
  """True when every inexact entry of ``tree`` is finite (integer leaves pass)."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)


def _keep_if(applied: jax.Array, new: Any, old: Any, *,
             floating_only: bool = False) -> Any:
  """``new`` where ``applied``, else ``old``, leaf by leaf (a select, no branch).

  With ``floating_only`` the other leaves always take ``new``: the model's integer
  RNG counters and keys advance, so a skipped step does not replay its random draws.
  """
  def select(a, b):
    if floating_only and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      return a
    return jnp.where(applied, a, b)
  return jax.tree.map(select, new, old)


def make_train_step(optimizer: optax.GradientTransformation,
                    jacobian: JacobianSchedule, *, unrolled: bool,
                    regularized: Optional[bool] = None,
                    forward_budget: Optional[int] = None,
                    mesh: Optional[Mesh] = None, donate: bool = True,
                    task: Task = Classification()) -> TrainStep:
  """Builds ``train_step(state, batch) -> (state, StepMetrics)``, jitted.

  Args:
    optimizer: the optax transformation the state was created with.
    jacobian: the regularization schedule (ignored when ``unrolled``: the penalty
      is defined at the equilibrium).
    unrolled: compile the pretraining variant (``model(..., unrolled=True)``).
    regularized: True: every step carries the Jacobian term (for the steps the
      schedule selected); False: none does; None: the step draws ``τ`` itself and
      branches with ``lax.cond``. Ignored unless the schedule is enabled.
    forward_budget: the hard-stopped forward budget of the equilibrium steps
      (jittered on regularized steps by the schedule); None: the model's own.
    mesh: data mesh; the batch is sharded over it and the state replicated.
      None: a mesh over all local devices.
    donate: reuse the input state's buffers for the output (the caller must not
      touch the old state afterwards).
    task: what the model computes from the batch and the loss (default:
      classification); a task's carry is read from and written to ``state.carry``.

  Bad data is handled as data, inside the compiled step: a step whose input
  inputs, loss or gradient hold a NaN or an infinity is *skipped* — the
  parameters, the whole optimizer state (its step count included), the carry and
  the floating model variables (batch statistics) keep their old values through a
  select (``jnp.where``), the train-state step counter and the RNG streams
  advance — and it reports ``nonfinite = 1`` and ``count = 0``, so the interval means cover the applied steps only. (The solve
  itself flags such samples ``diverged`` in its statistics.) A solve that does not
  converge is never an error, it shows up in the residual and ``converged``
  metrics.
  """
  regularizable = jacobian.enabled and not unrolled and regularized is not False

  def step_fn(state: TrainState, batch: Batch):
    key = jax.random.fold_in(state.rng, state.step)
    regularize, gamma, jitter = jacobian.draw(key, state.step, regularized)
    budget = None if unrolled else JacobianSchedule.budget(forward_budget, jitter)

    def forward(params, jac_probes, budget, penalty_weight):
      # copy=True: fresh Variables owned by this trace (the RNG counts mutate).
      model = nnx.merge(state.graphdef, params, state.model_state, copy=True)
      out = task.forward(model, batch, state.carry, train=True, unrolled=unrolled,
                         budget=budget, jac_probes=jac_probes)
      _, _, new_model_state = nnx.split(model, nnx.Param, ...)
      weight = jnp.maximum(out.weight, 1.0)
      task_loss = out.loss_sum / weight
      jac_loss = jnp.mean(out.aux.jac_loss).astype(jnp.float32)
      total = task_loss + penalty_weight * jac_loss
      return total, (task_loss, out.correct / weight, jac_loss, out.aux.stats,
                     new_model_state, out.carry)

    def plain(params):
      return forward(params, 0, budget, 0.0)

    def regularized_loss(params):
      return forward(params, jacobian.probes, budget, gamma)

    def loss_fn(params):
      if not regularizable:
        return plain(params)
      if regularized:
        return regularized_loss(params)
      return jax.lax.cond(regularize, regularized_loss, plain, params)

    grads, (task_loss, accuracy, jac_loss, stats, new_model_state,
            new_carry) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = (_all_finite(batch) & jnp.isfinite(task_loss) & _all_finite(grads))
    new_state = state.replace(
        params=_keep_if(finite, new_params, state.params),
        opt_state=_keep_if(finite, new_opt_state, state.opt_state),
        model_state=_keep_if(finite, new_model_state, state.model_state,
                             floating_only=True),
        carry=_keep_if(finite, new_carry, state.carry),
        step=state.step + 1)

    nfe, residual, residual_max, converged, samples = metrics_lib.solver_summary(stats)
    step_regularized = (regularize if regularizable
                        else jnp.zeros((), bool)).astype(jnp.float32)
    metrics = metrics_lib.StepMetrics(
        loss=task_loss, accuracy=accuracy, jac_loss=jac_loss * step_regularized,
        regularized=step_regularized,
        gamma=(gamma if jacobian.enabled and not unrolled
               else jnp.zeros((), jnp.float32)),
        fwd_nfe=nfe / samples, residual=residual / samples,
        residual_max=residual_max, converged=converged / samples,
        nonfinite=jnp.zeros((), jnp.float32), count=jnp.ones((), jnp.float32))
    # A skipped step adds nothing to the means but its nonfinite count.
    metrics = jax.tree.map(lambda value: jnp.where(finite, value, 0.0), metrics)
    metrics = metrics._replace(nonfinite=1.0 - finite.astype(jnp.float32),
                               count=finite.astype(jnp.float32))
    return new_state, metrics

  mesh = sharding_lib.data_mesh() if mesh is None else mesh
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(step_fn,
                 in_shardings=(replicated, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(*, mesh: Optional[Mesh] = None,
                   task: Task = Classification()) -> EvalStep:
  """Builds ``eval_step(state, batch, carry) -> (EvalSums, carry)``, jitted.

  The model runs with ``train=False`` (no dropout, the evaluation solver budget).
  The batch may carry ``"mask"`` (1 real, 0 padding) for the padded last batch;
  padded samples add nothing to any sum. ``carry`` is the task's state between
  the batches of one pass (None for classification; see
  :meth:`Task.init_carry`).
  """

  def eval_fn(state: TrainState, batch: Batch, carry: Any):
    model = nnx.merge(state.graphdef, state.params, state.model_state, copy=True)
    out = task.forward(model, batch, carry, train=False, unrolled=False,
                       budget=None, jac_probes=0)
    mask = task.sample_mask(batch)
    nfe, residual, residual_max, converged, samples = metrics_lib.solver_summary(
        out.aux.stats, mask)
    sums = metrics_lib.EvalSums(loss=out.loss_sum, correct=out.correct,
                                weight=out.weight, samples=samples, fwd_nfe=nfe,
                                residual=residual, residual_max=residual_max,
                                converged=converged)
    return sums, out.carry

  mesh = sharding_lib.data_mesh() if mesh is None else mesh
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(eval_fn,
                 in_shardings=(replicated, sharding_lib.batch_sharding(mesh),
                               replicated),
                 out_shardings=replicated)

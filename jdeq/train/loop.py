"""The training loop: resume, train, log, checkpoint, evaluate, report."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdeq.nn import num_params
from jdeq.train import distributed
from jdeq.train import metrics as metrics_lib
from jdeq.train import reporting
from jdeq.train import sharding as sharding_lib
from jdeq.train.checkpoint import Checkpointer
from jdeq.train.config import TrainConfig
from jdeq.train.optim import make_optimizer, make_schedule
from jdeq.train.regularization import JacobianSchedule
from jdeq.train.state import TrainState, create_train_state
from jdeq.train.steps import EvalStep, make_eval_step, make_train_step
from jdeq.train.tasks import Classification, Task

TrainBatches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]
EvalBatches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def _device_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, task: Task) -> dict:
  # Only what the steps read goes to the devices; the rest stays on the host.
  return sharding_lib.shard_batch(
      {name: batch[name] for name in task.inputs if name in batch}, mesh)


def _initial_carry(task: Task, state: TrainState, batch: Mapping[str, Any],
                   mesh: Mesh) -> Any:
  carry = task.init_carry(state.model(), batch)
  return None if carry is None else sharding_lib.replicate(carry, mesh)


def evaluate(state: TrainState, eval_step: EvalStep, batches: Iterable[Mapping],
             mesh: Mesh, *, max_batches: Optional[int] = None,
             task: Task = Classification()) -> dict[str, float]:
  """One pass over ``batches``: loss, accuracy (or perplexity), NFE, residuals and
  throughput (``<unit>_per_s``, e.g. ``images_per_s``).

  A task's carry (a language model's memory) starts empty at the first batch and
  runs through the pass in order.
  """
  start = time.monotonic()
  total, carry, units = None, None, 0
  for index, batch in enumerate(batches):
    if max_batches is not None and index >= max_batches:
      break
    if index == 0:
      carry = _initial_carry(task, state, batch, mesh)
    sums, carry = eval_step(state, _device_batch(batch, mesh, task), carry)
    total = metrics_lib.accumulate(total, sums)
    units += task.units(batch)
  if total is None:
    raise ValueError("the evaluation data produced no batches")
  summary = task.describe(metrics_lib.summarize_eval(total))
  summary[f"{task.unit}_per_s"] = units / max(time.monotonic() - start, 1e-9)
  return summary


def fit(model: nnx.Module, config: TrainConfig, *, train_batches: TrainBatches,
        eval_batches: EvalBatches, steps_per_epoch: int, workdir: str,
        meta: Optional[Mapping[str, Any]] = None, mesh: Optional[Mesh] = None,
        progress: bool = True, task: Task = Classification()) -> dict[str, Any]:
  """Trains ``model`` and writes checkpoints, metrics, a report and plots to ``workdir``.

  The metrics go to ``workdir/metrics.jsonl`` (one JSON record per log interval
  and evaluation) and, as the same scalars, to TensorBoard event files in
  ``workdir`` (tags ``train/<metric>`` and ``eval/<metric>``; see
  :class:`~jdeq.train.reporting.MetricsLog`).

  If ``workdir/checkpoints`` holds a checkpoint, training resumes from it: the
  restored state carries the parameters, optimizer state, step, training key and the
  model's RNG streams, and ``train_batches(step)`` restarts the data at that step,
  so a resumed run computes exactly what an uninterrupted one would.

  Args:
    model: an NNX module following the model call contract (see
      :mod:`jdeq.train.steps`), freshly initialized; it is not modified.
    config: the training configuration.
    train_batches: ``start_step -> iterator`` of global batches (``{"image",
      "label"}`` for classification, the task's ``inputs``) whose ``k``-th element
      depends only on ``k``.
    eval_batches: ``() -> iterable`` of evaluation batches, optionally with
      ``"mask"``.
    steps_per_epoch: training batches per epoch (for epochs-based settings).
    workdir: output directory.
    meta: extra JSON-able information stored in checkpoints and the report
      (typically the experiment configuration).
    mesh: data mesh (default: all devices).
    progress: show a tqdm progress bar.
    task: what the model computes from a batch and the loss
      (:mod:`jdeq.train.tasks`; default: classification). A task with a carry
      starts it from the first training batch and keeps it in the train state.

  Returns:
    The report (also written to ``workdir/report.json``).

  Raises:
    ValueError: ``workdir`` cannot be created or written (checked first).
    CheckpointError: the checkpoint in ``workdir`` is unreadable or was written by
      a different model (the message lists the mismatched arrays).
  """
  wall_start = time.monotonic()
  reporting.check_writable(workdir)  # before anything is built or compiled
  mesh = sharding_lib.data_mesh() if mesh is None else mesh
  # The run's length and schedules, resolved once and passed to every step.
  total_steps = config.num_steps(steps_per_epoch)
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  optimizer = make_optimizer(config, schedule)
  jacobian = JacobianSchedule.from_config(config, steps_per_epoch)
  meta = reporting.to_json(dict(meta or {}, train=config))
  eval_split = meta.get("eval_split", "test")

  state = sharding_lib.replicate(
      create_train_state(model, optimizer, seed=config.seed), mesh)
  if task.carries:  # the carry's shapes come from a batch (they are the same for all)
    state = state.replace(
        carry=_initial_carry(task, state, next(iter(train_batches(0))), mesh))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              config.keep_last_k)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(state)
  start_step = int(jax.device_get(state.step))
  log = reporting.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                             resume_step=start_step, tensorboard_dir=workdir)
  log.write({"kind": "start", "step": start_step, "total_steps": total_steps,
             "devices": mesh.size, "num_params": num_params(state.params)})

  pretrain_step = make_train_step(optimizer, jacobian, unrolled=True, mesh=mesh,
                                  task=task)
  equilibrium_step = make_train_step(optimizer, jacobian, unrolled=False,
                                     regularized=False,
                                     forward_budget=config.forward_budget, mesh=mesh,
                                     task=task)
  regularized_step = make_train_step(optimizer, jacobian, unrolled=False,
                                     regularized=True,
                                     forward_budget=config.forward_budget, mesh=mesh,
                                     task=task)
  regularized_at = jacobian.regularized_steps(state.rng, total_steps)
  eval_step = make_eval_step(mesh=mesh, task=task)

  def run_eval(step: int) -> dict[str, float]:
    summary = evaluate(state, eval_step, eval_batches(), mesh,
                       max_batches=config.max_eval_batches, task=task)
    log.write({"kind": "eval", "step": step, **summary})
    bar.write(f"step {step}: eval {_headline(summary)}, loss "
              f"{summary['loss']:.4f}, NFE {summary['fwd_nfe']:.1f}, rel residual "
              f"{summary['residual']:.2e}")
    return summary

  bar = reporting.ProgressBar(total=total_steps, initial=start_step,
                              disable=not progress, dynamic_ncols=True, desc="train")
  batches = train_batches(start_step)
  interval_total, interval_start, interval_steps = None, time.monotonic(), 0
  train_seconds, train_units, interval_units, last_train = 0.0, 0, 0, {}
  throughput = f"{task.unit}_per_s"
  stopped = "completed"
  step = start_step
  while step < total_steps:
    host_batch = next(batches)
    interval_units += task.units(host_batch)
    if step < config.pretrain_steps:
      step_fn = pretrain_step
    else:
      step_fn = regularized_step if regularized_at[step] else equilibrium_step
    state, step_metrics = step_fn(state, _device_batch(host_batch, mesh, task))
    interval_total = metrics_lib.accumulate(interval_total, step_metrics)
    interval_steps += 1
    step += 1
    # Decided by process 0 at the log steps in a multi-process job (all must stop).
    over_time = distributed.primary_decides(
        config.max_minutes is not None and
        time.monotonic() - wall_start > 60 * config.max_minutes,
        sync_point=step % config.log_every == 0)
    if step % config.log_every == 0 or step == total_steps or over_time:
      # The host sync of the interval.
      last_train = task.describe(metrics_lib.summarize_train(interval_total))
      elapsed = time.monotonic() - interval_start
      train_seconds += elapsed
      train_units += interval_units
      last_train.update(
          {throughput: interval_units / max(elapsed, 1e-9)},
          lr=float(schedule(step - 1)), epoch=step / steps_per_epoch,
          mode="unrolled" if step <= config.pretrain_steps else "equilibrium")
      log.write({"kind": "train", "step": step, **last_train})
      bar.update(interval_steps)
      postfix = dict(loss=f"{last_train['loss']:.3f}", **_progress_quality(last_train),
                     nfe=f"{last_train['fwd_nfe']:.1f}",
                     res=f"{last_train['residual']:.1e}",
                     jac=f"{last_train['jac_loss']:.2e}",
                     **{f"{task.unit[:3]}_s": f"{last_train[throughput]:.0f}"})
      bar.set_postfix(**postfix)
      if not progress:  # without a bar, the log interval is a printed line
        bar.write(f"step {step}/{total_steps}: " +
                  " ".join(f"{key} {value}" for key, value in postfix.items()))
      interval_total, interval_steps, interval_units = None, 0, 0
    if config.checkpoint_every and step % config.checkpoint_every == 0:
      checkpointer.save(state, meta)
    if (config.eval_every and step % config.eval_every == 0 and step < total_steps
        and not over_time):
      run_eval(step)
    if interval_steps == 0:
      interval_start = time.monotonic()
    if over_time:
      stopped = f"time budget of {config.max_minutes} minutes"
      bar.write(f"stopping at step {step}: {stopped} reached")
      break
  bar.close()
  checkpointer.save(state, meta)
  final = run_eval(step)
  checkpointer.close()
  log.close()

  report = {
      "final_test": final,
      "test_accuracy": final.get("accuracy"),
      "test_perplexity": final.get("perplexity"),
      "test_fwd_nfe": final["fwd_nfe"],
      "test_residual": final["residual"],
      "step": step,
      "epochs": step / steps_per_epoch,
      "total_steps": total_steps,
      "stopped": stopped,
      "resumed_from": start_step,
      f"train_{throughput}": train_units / train_seconds if train_seconds else None,
      "last_train": last_train,
      "wall_time_s": time.monotonic() - wall_start,
      "num_params": num_params(state.params),
      "devices": [str(device) for device in mesh.devices.flat],
      "config": meta,
  }
  reporting.write_report(os.path.join(workdir, "report.json"), report)
  report["plots"] = reporting.plot_curves(
      reporting.read_records(log.path), workdir)
  reporting.echo(f"final {eval_split} {_headline(final)} | forward NFE "
        f"{final['fwd_nfe']:.2f} | rel residual {final['residual']:.3e} | "
        f"train {report[f'train_{throughput}'] or 0:.1f} {task.unit}/s | wall "
        f"{report['wall_time_s']:.0f} s | {workdir}")
  return report


def _headline(summary: Mapping[str, float]) -> str:
  """The evaluation's quality figure: accuracy, or perplexity for language models."""
  if "perplexity" in summary:
    return f"perplexity {summary['perplexity']:.2f}"
  return f"accuracy {summary['accuracy']:.4f}"


def _progress_quality(summary: Mapping[str, float]) -> dict[str, str]:
  if "perplexity" in summary:
    return {"ppl": f"{summary['perplexity']:.1f}"}
  return {"acc": f"{summary['accuracy']:.3f}"}

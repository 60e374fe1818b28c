"""Step-by-step training parity of jdeq's MDEQ-Tiny with the authors' code.

    python -m experiments.reference_parity.main --reference-dir path/to/deq \\
        --torch-python path/to/python-with-torch --data-dir TFDS_DIR --out DIR \\
        [--unrolled-steps 20] [--equilibrium-steps 10] [--batch-size 16] \\
        [--tol 1e-3] [--stop-scope batch|sample] [--float64] \\
        [--self-check threads|float64|none]

The reference (a locuslab/deq checkout; commit 1fb7059 was used) builds MDEQ-Tiny
from its yaml with its own initialization; its initial weights are transplanted
into jdeq's ``mdeq_cifar_tiny`` (:mod:`experiments.reference_parity.transplant`),
and both train on the same real CIFAR-10 batches (jdeq's pipeline, no
augmentation) with dropout off, Adam 1e-3 without weight decay and the same
cosine schedule: ``--unrolled-steps`` pretraining steps (10 unrolled layers)
followed by ``--equilibrium-steps`` Broyden steps (18 forward / 20 backward, IFT).
jdeq trains through its own ``jdeq.train.make_train_step``; a second jitted
function evaluates, at the same parameters before each step, the logits, the
gradient per part and the backward solve's statistics.

Per step, side by side: loss, the logits' relative difference, gradient norm of the
stem / cell / head, the parameters' relative difference after the update, forward
and backward residuals (each side's batch-wide relative residual
``‖f(z) − z‖ / ‖f(z)‖``, the reference's stopping quantity) and NFE. Written to
``DIR/parity.json`` and ``DIR/parity.png``.

``--tol`` sets both sides' solver tolerance (at 0 both run their full budgets). The
reference stops the batch when the batch's residual reaches it and keeps the step
with the lowest batch residual; jdeq's solvers do the same here
(``--stop-scope batch``, the default, a solver's ``stop_scope="batch"``), or stop
and keep their best iterate per sample, jdeq's own default (``--stop-scope sample``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

if "--float64" in sys.argv:  # x64 must be on before JAX creates its first arrays
  jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jdeq
from experiments.reference_parity import transplant
from jdeq import data, models, ops
from jdeq import train as train_lib

ops.tune_cpu_runtime()  # must precede JAX's first computation

MODEL = "mdeq_cifar_tiny"
#: The reference TINY run's length (50 epochs of 390 steps): the cosine horizon.
TOTAL_STEPS = 19_500
PARTS = ("stem", "cell", "head")
TORCH_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_side.py")
MISSING = ("the parity harness runs the authors' MDEQ code beside jdeq and needs "
           "--reference-dir (a checkout of github.com/locuslab/deq, commit 1fb7059) "
           "and --torch-python (a Python with torch, e.g. from requirements-bench.txt)")


def model_config(tol: float, base: Optional[models.MDEQConfig] = None,
                 stop_scope: str = "batch") -> models.MDEQConfig:
  """``base`` (default MDEQ-Tiny) without dropout, every solver at tolerance ``tol``
  and with ``stop_scope`` (``"batch"``: stopping and best iterate decided on the
  whole batch's residual, as the reference's solvers decide them)."""
  base = models.get_config(MODEL) if base is None else base

  def scoped(solver):
    return dataclasses.replace(solver, tol=tol, stop_scope=stop_scope)

  return dataclasses.replace(base, dropout=0.0, solver=scoped(base.solver),
                             eval_solver=scoped(base.eval_solver),
                             grad=jdeq.IFT(scoped(base.grad.solver)))


def load_batches(data_dir: Optional[str], steps: int, batch_size: int) -> dict:
  """``steps`` real CIFAR-10 training batches from jdeq's pipeline (no augmentation)."""
  config = data.DataConfig(name="cifar10", data_dir=data_dir, batch_size=batch_size,
                           augment=False, prefetch=0)
  stream = data.train_batches(config)
  batches = [next(stream) for _ in range(steps)]
  return dict(images=np.stack([b["image"] for b in batches]).astype(np.float32),
              labels=np.stack([b["label"] for b in batches]).astype(np.int32))


def run_reference(args, batches_path: str, out_path: str) -> None:
  """The PyTorch side, in its own interpreter (see ``torch_side.py``)."""
  command = [args.torch_python, TORCH_SIDE, "parity", "--reference-dir",
             args.reference_dir, "--batches", batches_path, "--out", out_path,
             "--pretrain-steps", str(args.unrolled_steps),
             "--total-steps", str(TOTAL_STEPS), "--eps", repr(args.tol)]
  if args.float64:
    command.append("--float64")
  if args.threads:
    command += ["--threads", str(args.threads)]
  subprocess.run(command, check=True)


SELF_CHECKS = ("threads", "float64", "none")
#: The per-step differences that the reference's second run is compared by.
SPREAD_KEYS = ("loss_rel_diff", "logits_rel_diff", "grads_rel_diff", "params_rel_diff")


def rerun_settings(args: argparse.Namespace, check: str) -> argparse.Namespace:
  """The reference's settings for its second run: ``args`` changed only as ``check``
  says (``"threads"``: one thread, two if ``args`` asks for one; ``"float64"``)."""
  if check == "threads":
    threads = 2 if args.threads == 1 else 1
    return argparse.Namespace(**{**vars(args), "threads": threads})
  if check == "float64":
    if args.float64:
      raise ValueError("--self-check float64 compares a float32 run with a float64 "
                       "one; this run is float64 already (use --self-check threads)")
    return argparse.Namespace(**{**vars(args), "float64": True})
  raise ValueError(f"--self-check {check!r}: expected one of {SELF_CHECKS}")


def with_spread(rows: Sequence[Mapping[str, Any]], spread: Sequence[Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
  """``rows`` with the reference-against-itself differences of ``spread`` (rows of
  :func:`compare` between the reference's two runs) as ``*_self`` columns."""
  if len(rows) != len(spread):
    raise ValueError(f"{len(rows)} steps of jdeq against {len(spread)} of the "
                     f"reference's second run")
  return [dict(row, **{f"{key}_self": other[key] for key in SPREAD_KEYS})
          for row, other in zip(rows, spread)]


def _part(path: tuple) -> str:
  return path[0] if path[0] in ("stem", "head") else "cell"


def _batch_residual(stats: jdeq.SolverStats) -> jax.Array:
  """``‖f(z) − z‖ / ‖f(z)‖`` over the whole batch, from the per-sample residuals."""
  absolute = stats.abs_residual.astype(jnp.float32)
  image = absolute / jnp.maximum(stats.rel_residual.astype(jnp.float32), 1e-30)
  return jnp.sqrt(jnp.sum(absolute ** 2)) / jnp.sqrt(jnp.sum(image ** 2))


def _as_float64(model: nnx.Module) -> nnx.Module:
  """The model with every floating variable in float64."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: a.astype(jnp.float64)
                       if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
  return nnx.merge(graphdef, state)


def make_diagnostics(unrolled: bool) -> Callable:
  """Jitted ``(state, batch) -> dict``: logits, loss, gradient norms, solver stats."""

  def diagnose(state: train_lib.TrainState, batch: Mapping[str, jax.Array]) -> dict:
    probe = jdeq.backward_stats_probe(batch["image"].shape[0], batch["image"].dtype)

    def loss_fn(params, probe):
      model = nnx.merge(state.graphdef, params, state.model_state, copy=True)
      injection = model.stem(batch["image"], train=True)
      z, aux = model.deq(injection, train=True, unrolled=unrolled,
                         backward_probe=None if unrolled else probe)
      logits = model.readout(z, batch["image"], train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             batch["label"]).mean()
      return loss, (logits, aux.stats)

    (loss, (logits, stats)), (grads, probe_grad) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, probe)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(grads))
    norms = {part: jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                for path, g in flat.items() if _part(path) == part))
             for part in PARTS}
    result = dict(loss=loss, logits=logits, grads=flat,
                  **{f"grad_{p}": n for p, n in norms.items()})
    if unrolled:  # no solver runs
      nothing = jnp.full((), jnp.nan, jnp.float32)
      result.update(fwd_residual=nothing, fwd_nfe=nothing, bwd_residual=nothing,
                    bwd_nfe=nothing)
    else:
      backward = jdeq.backward_stats(probe_grad)
      result.update(fwd_residual=_batch_residual(stats),
                    fwd_nfe=jnp.max(stats.nstep).astype(jnp.float32),
                    bwd_residual=_batch_residual(backward),
                    bwd_nfe=jnp.max(backward.nstep).astype(jnp.float32))
    return result

  return jax.jit(diagnose)


def flat_params(model: nnx.Module, names: Sequence[str]) -> np.ndarray:
  """jdeq's parameters in the reference's layout, concatenated in ``names`` order."""
  exported = transplant.export(model)
  return np.concatenate([exported[name].ravel() for name in names])


def run_jdeq(reference: Mapping[str, np.ndarray], batches: Mapping[str, np.ndarray],
             unrolled_steps: int, tol: float, lr: float = 1e-3,
             base: Optional[models.MDEQConfig] = None,
             float64: bool = False, stop_scope: str = "batch") -> dict[str, list]:
  """jdeq's side: the transplanted model trained on ``batches``; per-step records.

  ``reference`` holds the reference's initial weights (``init/NAME``) and the
  parameter order ``names``; ``base`` is the MDEQ configuration (default
  MDEQ-Tiny); ``float64`` runs the model in float64 (needs ``jax_enable_x64``).
  """
  model = models.create(model_config(tol, base, stop_scope), rngs=nnx.Rngs(0))
  if float64:
    model = _as_float64(model)
  transplant.load(model, {key[len("init/"):]: value for key, value in reference.items()
                          if key.startswith("init/")})
  config = train_lib.TrainConfig(optimizer="adam", lr=lr, schedule="cosine",
                                 total_steps=TOTAL_STEPS)
  optimizer = train_lib.make_optimizer(
      config, train_lib.make_schedule(config, 1, TOTAL_STEPS))
  state = train_lib.create_train_state(model, optimizer, seed=0)
  schedule = train_lib.JacobianSchedule()
  steps = {flag: train_lib.make_train_step(optimizer, schedule, unrolled=flag,
                                           donate=False) for flag in (True, False)}
  diagnostics = {flag: make_diagnostics(flag) for flag in (True, False)}
  names = [str(name) for name in reference["names"]]
  records: dict[str, list] = {}
  for t in range(len(batches["images"])):
    unrolled = t < unrolled_steps
    batch = {"image": jnp.asarray(batches["images"][t],
                                  jnp.float64 if float64 else jnp.float32),
             "label": jnp.asarray(batches["labels"][t])}
    found = jax.device_get(diagnostics[unrolled](state, batch))
    state, metrics = steps[unrolled](state, batch)
    found["step_loss"] = float(metrics.loss)
    found["params"] = flat_params(state.model(), names)
    grads = transplant.export_arrays(found.pop("grads"))
    found["grads"] = np.concatenate([grads[name].ravel() for name in names])
    for key, value in found.items():
      records.setdefault(key, []).append(np.asarray(value))
    print(f"jdeq step {t} ({'unrolled' if unrolled else 'equilibrium'}): loss "
          f"{float(found['loss']):.6f}", flush=True)
  return records


def _relative(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(np.ravel(a) - np.ravel(b))
               / max(np.linalg.norm(np.ravel(b)), 1e-30))


def compare(reference: Mapping[str, np.ndarray], ours: Mapping[str, list],
            unrolled_steps: int) -> list[dict[str, Any]]:
  """Per-step rows: both sides' figures and their relative differences."""
  rows = []
  for t in range(len(ours["loss"])):
    row: dict[str, Any] = dict(
        step=t, mode="unrolled" if t < unrolled_steps else "equilibrium",
        loss_jdeq=float(ours["loss"][t]), loss_reference=float(reference["loss"][t]),
        loss_rel_diff=abs(float(ours["loss"][t]) - float(reference["loss"][t]))
        / abs(float(reference["loss"][t])),
        logits_rel_diff=_relative(ours["logits"][t], reference["logits"][t]),
        grads_rel_diff=_relative(ours["grads"][t], reference["grads"][t]),
        params_rel_diff=_relative(ours["params"][t], reference["params"][t]))
    for part in PARTS:
      row[f"grad_{part}_jdeq"] = float(ours[f"grad_{part}"][t])
      row[f"grad_{part}_reference"] = float(reference[f"grad_{part}"][t])
    if t >= unrolled_steps:
      for key in ("fwd_residual", "fwd_nfe", "bwd_residual", "bwd_nfe"):
        row[f"{key}_jdeq"] = float(ours[key][t])
        row[f"{key}_reference"] = float(reference[key][t])
    rows.append(row)
  return rows


def first_parting(rows: Sequence[Mapping[str, Any]], mode: str, tol: float,
                  key: str = "loss_rel_diff") -> Optional[int]:
  """The first step of ``mode`` whose loss differs by more than ``tol`` (relative);
  ``key`` ``"loss_rel_diff_self"`` asks it of the reference against itself."""
  return next((row["step"] for row in rows
               if row["mode"] == mode and row[key] > tol), None)


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Worst differences per mode and the acceptance checks."""
  out = {}
  for mode, tol in (("unrolled", 1e-4), ("equilibrium", 1e-3)):
    chosen = [row for row in rows if row["mode"] == mode]
    if not chosen:
      continue
    out[mode] = dict(steps=len(chosen),
                     max_loss_rel_diff=max(r["loss_rel_diff"] for r in chosen),
                     max_logits_rel_diff=max(r["logits_rel_diff"] for r in chosen),
                     max_params_rel_diff=max(r["params_rel_diff"] for r in chosen),
                     loss_tolerance=tol, first_step_beyond=first_parting(rows, mode, tol))
    if "loss_rel_diff_self" in chosen[0]:
      out[mode]["reference_self"] = dict(
          **{f"max_{key}": max(r[f"{key}_self"] for r in chosen) for key in SPREAD_KEYS},
          first_step_beyond=first_parting(rows, mode, tol, "loss_rel_diff_self"))
  return out


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  steps = [row["step"] for row in rows]
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.plot(steps, [r["loss_reference"] for r in rows], "o-", label="reference (PyTorch)")
  left.plot(steps, [r["loss_jdeq"] for r in rows], "x--", label="jdeq")
  left.set(xlabel="step", ylabel="training loss", title="MDEQ-Tiny, same batches")
  for key, label in (("loss_rel_diff", "loss"), ("logits_rel_diff", "logits"),
                     ("params_rel_diff", "parameters")):
    line, = right.semilogy(steps, [max(r[key], 1e-12) for r in rows], label=label)
    if f"{key}_self" in rows[0]:
      right.semilogy(steps, [max(r[f"{key}_self"], 1e-12) for r in rows], ":",
                     color=line.get_color(), label=f"{label}, reference vs itself")
  right.set(xlabel="step", ylabel="relative difference", title="jdeq vs reference")
  switch = next((r["step"] for r in rows if r["mode"] == "equilibrium"), None)
  for axis in (left, right):
    if switch is not None:
      axis.axvline(switch - 0.5, color="grey", lw=0.8, ls=":")
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def report(rows: Sequence[Mapping[str, Any]]) -> str:
  spread = "loss_rel_diff_self" in rows[0]
  lines = ["step mode        loss(ref)   loss(jdeq)  d_loss   d_logits d_params "
           + ("d_loss_self " if spread else "")
           + "|g| stem/cell/head ref -> jdeq          fwd res ref/jdeq  NFE"]
  for r in rows:
    grads = " ".join(f"{r[f'grad_{p}_reference']:.3g}/{r[f'grad_{p}_jdeq']:.3g}"
                     for p in PARTS)
    solver = (f"{r['fwd_residual_reference']:.3g}/{r['fwd_residual_jdeq']:.3g} "
              f"{r['fwd_nfe_reference']:.0f}/{r['fwd_nfe_jdeq']:.0f}"
              if "fwd_residual_jdeq" in r else "")
    lines.append(f"{r['step']:4d} {r['mode']:<11} {r['loss_reference']:.6f}  "
                 f"{r['loss_jdeq']:.6f}  {r['loss_rel_diff']:.1e}  "
                 f"{r['logits_rel_diff']:.1e}  {r['params_rel_diff']:.1e}  "
                 + (f"{r['loss_rel_diff_self']:.1e}     " if spread else "")
                 + f"{grads}  "
                 f"{solver}")
  return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
  result = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  result.add_argument("--reference-dir", default=None,
                      help="a checkout of locuslab/deq (never copied into jdeq)")
  result.add_argument("--torch-python", default=None,
                      help="a Python interpreter with torch for the reference side")
  result.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR"))
  result.add_argument("--out", default="runs/reference_parity")
  result.add_argument("--unrolled-steps", type=int, default=20)
  result.add_argument("--equilibrium-steps", type=int, default=10)
  result.add_argument("--batch-size", type=int, default=16)
  result.add_argument("--tol", type=float, default=1e-3,
                      help="both sides' solver tolerance (0: full budgets)")
  result.add_argument("--threads", type=int, default=None)
  result.add_argument("--stop-scope", choices=("batch", "sample"), default="batch",
                      help="jdeq's solvers stop and keep their best iterate on the "
                           "whole batch's residual, as the reference's do (batch), or "
                           "per sample, jdeq's default (sample)")
  result.add_argument("--float64", action="store_true",
                      help="both sides in float64 (float32 round-off grows through "
                           "the map's unstable iterations; float64 shows the maths)")
  result.add_argument("--self-check", choices=SELF_CHECKS, default="threads",
                      help="run the reference again with another thread count "
                           "(threads) or in float64, and report how far it parts from "
                           "itself beside how far jdeq parts from it")
  return result


def _load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as stored:
    return {key: stored[key] for key in stored.files}


def main(argv: Optional[Sequence[str]] = None,
         reference_runner: Callable = run_reference) -> int:
  args = parser().parse_args(argv)
  if reference_runner is run_reference and not (args.reference_dir and args.torch_python):
    print(f"error: {MISSING}", file=sys.stderr)
    return 2
  try:  # settled before anything runs, so that a bad combination fails at once
    rerun_args = (None if args.self_check == "none"
                  else rerun_settings(args, args.self_check))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if args.float64 and not jax.config.jax_enable_x64:
    raise SystemExit("--float64 needs jax_enable_x64 from the start: run this module "
                     "as a script with --float64 (or JAX_ENABLE_X64=1)")
  os.makedirs(args.out, exist_ok=True)
  total = args.unrolled_steps + args.equilibrium_steps
  batches = load_batches(args.data_dir, total, args.batch_size)
  with tempfile.TemporaryDirectory() as scratch:
    batches_path = os.path.join(scratch, "batches.npz")
    np.savez(batches_path, **batches)
    reference_path = os.path.join(scratch, "reference.npz")
    reference_runner(args, batches_path, reference_path)
    reference = _load(reference_path)
    if rerun_args is not None:
      rerun_path = os.path.join(scratch, "reference_rerun.npz")
      reference_runner(rerun_args, batches_path, rerun_path)
      rows_self = compare(reference, _load(rerun_path), args.unrolled_steps)
  ours = run_jdeq(reference, batches, args.unrolled_steps, args.tol,
                  float64=args.float64, stop_scope=args.stop_scope)
  rows = compare(reference, ours, args.unrolled_steps)
  if rerun_args is not None:
    rows = with_spread(rows, rows_self)
  result = dict(settings=dict(model=MODEL, batch_size=args.batch_size,
                              unrolled_steps=args.unrolled_steps,
                              equilibrium_steps=args.equilibrium_steps, tol=args.tol,
                              lr=1e-3, total_steps=TOTAL_STEPS, dropout=0.0,
                              float64=args.float64, stop_scope=args.stop_scope,
                              self_check=args.self_check),
                summary=summary(rows), steps=rows)
  with open(os.path.join(args.out, "parity.json"), "w") as handle:
    json.dump(result, handle, indent=1)
  plot(rows, os.path.join(args.out, "parity.png"))
  print(report(rows))
  print(json.dumps(result["summary"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Runs the jdeq vs TorchDEQ benchmark: every solver × gradient variant per workload.

For each workload × variant both sides are set up (jdeq: compiled, warmed up;
TorchDEQ: built in the worker subprocess, warmed up), then measured in alternating
rounds — a jdeq round, a TorchDEQ round, and so on — so that slow drift of the
machine affects both alike. Each jdeq round times the fused training step, its
forward and backward halves and the bare evaluations; each TorchDEQ round times
training steps (forward, backward and whole step from one call) and the bare
evaluations. Afterwards, peak memory of a training step is measured for forward
budgets 10, 30 and 100 (IFT against unrolled).

Fair conditions, printed with the table:

* threads: both sides get the same number of cores (``--threads``, default all);
  when fewer, both processes are pinned to the same cores before either framework
  starts its thread pool;
* XLA's CPU flags (``--xla-flags``): by default XLA's own convolutions (Eigen)
  instead of its YNNPACK ones (see ``DEFAULT_XLA_FLAGS``); PyTorch uses oneDNN's;
* memory: both processes run with glibc's malloc keeping freed memory for reuse
  (:func:`jdeq.ops.retain_freed_host_memory`, as every jdeq entry point; the worker
  through the equivalent environment variables), so neither side page-faults its
  working memory back in on every step (``--torch-malloc default`` runs TorchDEQ
  with glibc's defaults instead, as a plain PyTorch script runs);
* W3's models must have the same number of parameters on both sides (checked).

Workload ``w3ref`` (opt-in, not in the default run) sets jdeq beside the authors'
own MDEQ code instead of TorchDEQ: MDEQ-Tiny's two training steps — equilibrium
(Broyden, IFT) and unrolled pretraining — as jdeq's training loop compiles them
(:func:`experiments.bench.jdeq_side.training_step`) and as the reference's
``cls_function.train`` runs them (:mod:`experiments.bench.reference_side`, a worker
in a Python with torch and the reference's imports), alternating round by round on
the same batch. It needs ``--reference-dir``, a checkout of locuslab/deq; without
it, or without a usable ``--reference-python`` (default: ``--torch-python``), it is
skipped with a message and the other workloads run.

Outputs (``--out``, default ``experiments/bench/results``): ``results.json``,
``<workload>_times.png``, ``memory_scaling.png``, and the markdown table, written
into README.md between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` (or to
``table.md`` in the output folder when the README has no such markers).

Run: ``python -m experiments.bench [--workloads w1,w2,w3] [--variants
default|all|LIST] [--scale S] [--threads N] [--torch-python PATH | --no-torch]``;
``python -m experiments.bench --workloads w3ref --reference-dir DEQ
[--reference-python PATH]`` for jdeq against the authors' code.
The TorchDEQ interpreter defaults to ``$JDEQ_BENCH_TORCH_PYTHON`` or
``.venv-bench/bin/python`` in the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from experiments.bench import jdeq_side, report, timing, workloads
from jdeq import ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO_ROOT, "experiments", "bench", "results")
MEMORY_BUDGETS = (10, 30, 100)
MEMORY_VARIANTS = ("anderson/ift", workloads.UNROLLED)
# W3's memory scaling would compile six MDEQ steps (minutes on a 2-core CPU).
MEMORY_WORKLOADS = ("w1", "w2")
# XLA's own convolutions instead of YNNPACK's (see jdeq.ops.CPU_CONVOLUTION_FLAG):
# about 2x on a 2-core CPU for W2's and W3's convolutions. Reductions stay with
# YNNPACK: faster for MDEQ's GroupNorms (~10% of a W3 map evaluation).
DEFAULT_XLA_FLAGS = ops.CPU_CONVOLUTION_FLAG
TORCH_SIDE_MODULE = "experiments.bench.torch_side"
REFERENCE_SIDE_MODULE = "experiments.bench.reference_side"
# What the reference's MDEQ code imports beyond the standard library and NumPy.
REFERENCE_IMPORTS = ("torch", "yacs", "termcolor", "scipy")
REFERENCE_MISSING = (
    "w3ref runs the authors' MDEQ code (github.com/locuslab/deq, MDEQ-Vision, commit "
    "1fb7059) beside jdeq and needs --reference-dir, a checkout of it (never copied "
    "into jdeq), and a Python with torch, yacs, termcolor and scipy "
    "(requirements-bench.txt; --reference-python, default: --torch-python)")


def default_torch_python() -> str:
  """``$JDEQ_BENCH_TORCH_PYTHON``, else ``.venv-bench/bin/python`` in the repository root."""
  return os.environ.get("JDEQ_BENCH_TORCH_PYTHON",
                        os.path.join(REPO_ROOT, ".venv-bench", "bin", "python"))


def torch_side_problem(python: str) -> str | None:
  """Why ``python`` cannot run the PyTorch side (no such file, or no torch and
  torchdeq there), or None when it can."""
  if not os.path.exists(python):
    return f"no TorchDEQ interpreter at {python!r}"
  probe = subprocess.run([python, "-c", "import torch, torchdeq"],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    reason = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
    return f"{python!r} cannot import torch and torchdeq ({reason})"
  return None


def reference_problem(python: str, reference_dir: str | None) -> str | None:
  """Why w3ref cannot run: no ``--reference-dir``, not a locuslab/deq checkout, or a
  ``python`` that cannot import the reference's dependencies; None when it can."""
  if not reference_dir:
    return f"{REFERENCE_MISSING}; no --reference-dir given"
  if not os.path.isfile(os.path.join(reference_dir, "MDEQ-Vision", "lib", "models",
                                     "mdeq.py")):
    return (f"--reference-dir {reference_dir!r} has no MDEQ-Vision/lib/models/mdeq.py; "
            f"{REFERENCE_MISSING}")
  if not os.path.exists(python):
    return f"no reference interpreter at {python!r}; {REFERENCE_MISSING}"
  probe = subprocess.run([python, "-c", "import " + ", ".join(REFERENCE_IMPORTS)],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    reason = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
    return (f"{python!r} cannot import {', '.join(REFERENCE_IMPORTS)} ({reason}); "
            f"{REFERENCE_MISSING}")
  return None


def child_environment(retain_memory: bool) -> dict[str, str]:
  """This process's environment for a child in the repository (the TorchDEQ side)."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  if retain_memory:
    env.update(ops.RETAIN_FREED_MEMORY_ENVIRONMENT)
  return env


def run_torch_side_once(python: str, option: str, request: dict,
                        env: dict[str, str]) -> dict:
  """``python -m experiments.bench.torch_side <option> <request JSON>`` in a fresh
  process; returns the JSON line it prints last.

  Raises:
    RuntimeError: if that process fails; the message ends with its error output.
  """
  finished = subprocess.run(
      [python, "-m", "experiments.bench.torch_side", option, json.dumps(request)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  if finished.returncode != 0:
    raise RuntimeError(f"the PyTorch side ({python}) failed with code "
                       f"{finished.returncode}:\n{finished.stderr[-2000:]}")
  return json.loads(finished.stdout.strip().splitlines()[-1])


class TorchWorker:
  """A PyTorch worker subprocess, spoken to in JSON lines: the TorchDEQ side, or
  another worker ``module`` (the authors' code of w3ref, the time-to-tolerance
  sides) started with command-line ``arguments``."""

  def __init__(self, python: str, threads: int, retain_memory: bool,
               module: str = TORCH_SIDE_MODULE, label: str = "TorchDEQ",
               arguments: tuple[str, ...] = ()):
    env = dict(child_environment(retain_memory), JDEQ_BENCH_TORCH_THREADS=str(threads))
    self.python = python
    self.retain_memory = retain_memory
    self.label = label
    self.process = subprocess.Popen(
        [python, "-m", module, *arguments], cwd=REPO_ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def request(self, **message) -> dict:
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.label} worker exited (code {self.process.poll()})")
    reply = json.loads(line)
    if not reply.pop("ok"):
      raise RuntimeError(f"{self.label} worker: {reply['error']}")
    return reply

  def memory(self, workload: str, variant: str, forward_iters: int) -> dict:
    """Peak memory of one step, in a fresh process of the TorchDEQ environment."""
    return run_torch_side_once(
        self.python, "--memory",
        dict(workload=workload, variant=variant, forward_iters=forward_iters),
        child_environment(self.retain_memory))

  def close(self) -> None:
    try:
      self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.process.stdin.flush()
    except (BrokenPipeError, ValueError):
      pass
    self.process.wait(timeout=30)


def _timing_dict(rounds: list[list[float]]) -> dict:
  return timing.Timing.from_samples(rounds).as_dict()


def measure_cell(workload: str, variant: str, worker: TorchWorker | None, *,
                 reps: int, rounds: int, warmup: int) -> dict[str, Any]:
  """Both sides of one workload × variant, in alternating rounds.

  Raises:
    RuntimeError: if the two sides' models differ in their number of parameters.
  """
  spec = workloads.workload(workload)
  evaluations, vjps = workloads.evaluation_counts(variant, spec)
  built = jdeq_side.build_variant(workload, variant)
  compile_figures = built.compile_step()
  counts = built.counts()  # also the first call of the compiled step
  calls = built.calls()
  for call in calls.values():
    for _ in range(warmup):
      call()
  jdeq_rounds = {name: [] for name in calls}
  torch_rounds = {name: [] for name in ("step", "forward", "backward", "bare")}
  parameters = jdeq_side.parameter_count(built.cell)
  if worker:
    torch_parameters = worker.request(cmd="setup", workload=workload, variant=variant,
                                      warmup=warmup)["parameters"]
    if torch_parameters != parameters:
      raise RuntimeError(f"{workload}: the jdeq model has {parameters} parameters, the "
                         f"TorchDEQ model {torch_parameters}; the workloads differ")
  for _ in range(rounds):
    for name, call in calls.items():
      jdeq_rounds[name].append(timing.time_round(call, reps))
    if worker:
      steps = worker.request(cmd="time", reps=reps)
      for name in ("step", "forward", "backward"):
        torch_rounds[name].append(steps[name])
      torch_rounds["bare"].append(worker.request(
          cmd="bare", reps=reps, evaluations=evaluations, vjps=vjps)["bare"])

  jdeq_timings = {name: _timing_dict(r) for name, r in jdeq_rounds.items()}
  cell = {
      "workload": workload, "variant": variant, "parameters": parameters,
      "reps": reps, "rounds": rounds,
      "bare_counts": {"evaluations": evaluations, "vjps": vjps},
      "jdeq": {"timings": jdeq_timings, "compile": compile_figures,
               "counts": counts,
               "overhead": jdeq_timings["step"]["median"] / jdeq_timings["bare"]["median"]},
  }
  if worker:
    torch_timings = {name: _timing_dict(r) for name, r in torch_rounds.items()}
    cell["torch"] = {
        "timings": torch_timings, "counts": worker.request(cmd="counts"),
        "overhead": torch_timings["step"]["median"] / torch_timings["bare"]["median"]}
    cell["speedup"] = {name: torch_timings[name]["median"] / jdeq_timings[name]["median"]
                       for name in ("step", "forward", "backward")}
  return cell


def measure_reference_cell(kind: str, worker: TorchWorker, reference_dir: str, *,
                           reps: int, rounds: int, warmup: int) -> dict[str, Any]:
  """w3ref's ``kind`` step ("equilibrium" or "unrolled"): jdeq's and the authors'
  training step, in alternating rounds, each side advancing its own training.

  The first call of each side's step is untimed, then ``warmup`` more; the solver
  figures are read after the rounds.

  Raises:
    RuntimeError: if either model does not have MDEQ-Tiny's 158,890 parameters.
  """
  built = jdeq_side.training_step(kind)
  parameters = built.parameter_count()
  if parameters != workloads.W3_PARAMS:
    raise RuntimeError(f"w3ref: the jdeq model has {parameters} parameters, MDEQ-Tiny "
                       f"{workloads.W3_PARAMS}")
  compile_figures = built.compile()
  for _ in range(1 + warmup):
    built.call()
  reference_parameters = worker.request(cmd="setup", reference_dir=reference_dir,
                                        kind=kind, warmup=1 + warmup)["parameters"]
  if reference_parameters != workloads.W3_PARAMS:
    raise RuntimeError(f"w3ref: the reference model has {reference_parameters} "
                       f"parameters, MDEQ-Tiny {workloads.W3_PARAMS}")
  jdeq_rounds, reference_rounds = [], []
  for _ in range(rounds):
    jdeq_rounds.append(timing.time_round(built.call, reps))
    reference_rounds.append(worker.request(cmd="time", reps=reps)["step"])
  jdeq_step, reference_step = _timing_dict(jdeq_rounds), _timing_dict(reference_rounds)
  return {
      "workload": workloads.W3REF.name, "variant": kind, "parameters": parameters,
      "reference_parameters": reference_parameters, "reps": reps, "rounds": rounds,
      "jdeq": {"timings": {"step": jdeq_step}, "compile": compile_figures,
               "counts": built.counts()},
      "reference": {"timings": {"step": reference_step},
                    "counts": worker.request(cmd="counts")},
      "ratio": {"step": reference_step["median"] / jdeq_step["median"]},
  }


def reference_line(cell: dict[str, Any], elapsed: float) -> str:
  """The progress line of a w3ref cell: medians, their ratio, both sides' NFE."""
  jd, ref = cell["jdeq"], cell["reference"]
  return (f"w3ref {cell['variant']:<12} jdeq step "
          f"{jd['timings']['step']['median'] * 1e3:9.1f} ms | reference step "
          f"{ref['timings']['step']['median'] * 1e3:9.1f} ms  reference/jdeq "
          f"{cell['ratio']['step']:.2f}  NFE fwd/bwd jdeq "
          f"{report.nfe_pair(jd['counts'])}, reference "
          f"{report.nfe_pair(ref['counts'])}  ({elapsed:.0f} s)")


def measure_memory(workload_names, worker: TorchWorker | None) -> list[dict]:
  """Step memory for forward budgets 10/30/100, IFT against unrolled (W1, W2)."""
  rows = []
  for workload in (w for w in workload_names if w in MEMORY_WORKLOADS):
    for variant in MEMORY_VARIANTS:
      for budget in MEMORY_BUDGETS:
        built = jdeq_side.build_variant(workload, variant, forward_iters=budget)
        figures = built.compile_step()
        rows.append({"workload": workload, "variant": variant, "forward_iters": budget,
                     "jdeq_temp_bytes": figures["temp_bytes"],
                     "torch": worker.memory(workload, variant, budget) if worker else None})
        print(f"  memory {workload} {variant} budget {budget}: jdeq temp "
              f"{figures['temp_bytes'] / 2**20:.2f} MiB"
              + (f", TorchDEQ saved {rows[-1]['torch']['saved_bytes'] / 2**20:.2f} MiB"
                 if worker else ""), flush=True)
  return rows


def parse_args(argv):
  parser = argparse.ArgumentParser(description="jdeq vs TorchDEQ benchmark")
  parser.add_argument("--workloads", default=",".join(workloads.DEFAULT_WORKLOADS),
                      help="comma-separated workloads (w1, w2, w3; w3ref, jdeq vs the "
                           "authors' code, on request: it needs --reference-dir)")
  parser.add_argument("--variants", default="default",
                      help="'default' (each workload's own list), 'all' (every solver "
                           "x gradient, plus unrolled) or a comma-separated list like "
                           "anderson/ift,unrolled")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies each workload's repetitions per round")
  parser.add_argument("--rounds", type=int, default=None,
                      help="rounds per side (default: the workload's)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed calls per measure (default: the workload's)")
  parser.add_argument("--torch-python", default=default_torch_python())
  parser.add_argument("--no-torch", action="store_true", help="run the jdeq side only")
  parser.add_argument("--reference-dir", default=None,
                      help="w3ref: a checkout of github.com/locuslab/deq (its "
                           "MDEQ-Vision code runs unmodified)")
  parser.add_argument("--reference-python", default=None,
                      help="w3ref: a Python with torch, yacs, termcolor and scipy "
                           "(default: --torch-python)")
  parser.add_argument("--torch-malloc", choices=("retained", "default"), default="retained",
                      help="glibc malloc on the TorchDEQ side: 'retained' keeps freed "
                           "memory for reuse, as the jdeq side does (fair default); "
                           "'default' is what a plain PyTorch script gets")
  parser.add_argument("--threads", type=int, default=0,
                      help="cores, and so threads, for each side (0: all). Both "
                           "processes are pinned to the same cores. On a busy machine "
                           "PyTorch's spinning OpenMP threads can slow TorchDEQ down "
                           "by 10x and more; 1 avoids that, on both sides alike")
  parser.add_argument("--xla-flags", default=DEFAULT_XLA_FLAGS,
                      help="appended to $XLA_FLAGS before JAX starts ('' for XLA's "
                           "defaults)")
  parser.add_argument("--no-memory", action="store_true", help="skip memory scaling")
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--readme", default=os.path.join(REPO_ROOT, "README.md"),
                      help="README to write the table into ('' to skip)")
  return parser.parse_args(argv)


def configure_processes(threads: int, xla_flags: str) -> dict:
  """Pins the cores, sets XLA's flags (and the convolution weight-gradient form that
  suits them) and makes malloc keep freed memory (on both sides); must run before
  JAX starts its backend.

  Returns:
    The conditions to report: cores per side, the XLA flags in effect, jdeq's
    weight-gradient form and whether freed memory is retained.
  """
  cores = timing.pin_threads(threads)
  retained = ops.retain_freed_host_memory()
  if xla_flags:
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags) if f)
  # The weight-gradient form that suits those convolutions, as every entry point
  # gets from ops.tune_cpu_runtime.
  weight_gradient = ops.match_weight_gradient_to_convolutions()
  if jdeq_side.backend_started():
    print("WARNING: JAX started before the benchmark could set its threads and XLA "
          "flags; they may not apply", flush=True)
  return {"threads": cores, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "weight_gradient": weight_gradient, "retained_freed_memory": retained}


def _variants_of(spec: workloads.Workload, requested: str) -> tuple[str, ...]:
  if requested == "all":
    return workloads.all_variants()
  if requested == "default":
    return spec.default_variants
  variants = tuple(v for v in requested.split(",") if v)
  for variant in variants:
    workloads.split_variant(variant)
  return variants


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  started = time.perf_counter()
  workload_names = [w for w in args.workloads.split(",") if w]
  for name in workload_names:
    workloads.workload(name)  # fails early, naming the valid workloads
  os.makedirs(args.out, exist_ok=True)

  conditions = configure_processes(args.threads, args.xla_flags)
  load = timing.machine_load()
  warning = timing.idle_warning()
  device = jdeq_side.describe_device()
  print(f"device: {device}; {conditions['threads']} threads per side; XLA_FLAGS="
        f"{conditions['xla_flags']!r}", flush=True)
  if warning:
    print(warning, flush=True)

  worker = None
  # w3ref's reference side is its own worker; TorchDEQ is needed by the others only.
  if not args.no_torch and any(n != workloads.W3REF.name for n in workload_names):
    problem = torch_side_problem(args.torch_python)
    if problem is None:
      worker = TorchWorker(args.torch_python, conditions["threads"],
                           retain_memory=args.torch_malloc == "retained")
      conditions["torch_retained_freed_memory"] = worker.retain_memory
    else:
      print(f"WARNING: {problem} (create the PyTorch side's environment from "
            "requirements-bench.txt or pass --torch-python); running jdeq only", flush=True)
  results: dict[str, Any] = {"device": device, "load": load, "warning": warning,
                             "conditions": conditions, "cells": [], "memory": [],
                             "skipped": {}}
  reference = None
  if workloads.W3REF.name in workload_names:
    reference_dir = args.reference_dir and os.path.abspath(args.reference_dir)
    problem = reference_problem(args.reference_python or args.torch_python,
                                reference_dir)
    if problem is None:
      reference = TorchWorker(args.reference_python or args.torch_python,
                              conditions["threads"],
                              retain_memory=args.torch_malloc == "retained",
                              module=REFERENCE_SIDE_MODULE, label="reference")
      conditions["reference_retained_freed_memory"] = reference.retain_memory
    else:
      print(f"WARNING: {problem}; skipping w3ref", flush=True)
      results["skipped"][workloads.W3REF.name] = problem
  try:
    if worker:
      results["torch_device"] = worker.request(cmd="info")["device"]
      print(f"TorchDEQ side: {results['torch_device']}", flush=True)
    if reference:
      results["reference_device"] = reference.request(cmd="info")["device"]
      print(f"reference side: {results['reference_device']}", flush=True)
    for name in workload_names:
      spec = workloads.workload(name)
      reps = max(1, round(spec.reps * args.scale))
      rounds = args.rounds or spec.rounds
      warmup = spec.warmup if args.warmup is None else args.warmup
      if name == workloads.W3REF.name:
        for kind in workloads.REFERENCE_KINDS if reference else ():
          cell = measure_reference_cell(kind, reference, reference_dir, reps=reps,
                                        rounds=rounds, warmup=warmup)
          results["cells"].append(cell)
          print(reference_line(cell, time.perf_counter() - started), flush=True)
        continue
      for variant in _variants_of(spec, args.variants):
        cell = measure_cell(name, variant, worker, reps=reps, rounds=rounds,
                            warmup=warmup)
        results["cells"].append(cell)
        step = cell["jdeq"]["timings"]["step"]["median"]
        line = (f"{name} {variant:<32} jdeq step {step * 1e3:9.3f} ms  overhead "
                f"{cell['jdeq']['overhead']:.2f}  ({time.perf_counter() - started:.0f} s)")
        if worker:
          line += (f" | TorchDEQ step {cell['torch']['timings']['step']['median'] * 1e3:9.3f}"
                   f" ms  speedup {cell['speedup']['step']:.2f}x")
        print(line, flush=True)
    if not args.no_memory:
      results["memory"] = measure_memory(workload_names, worker)
  finally:
    for side in (worker, reference):
      if side:
        side.close()

  results["end_load"] = timing.machine_load()
  results["wall_s"] = time.perf_counter() - started
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  if not results["cells"]:  # a README table of nothing would replace the last one
    print("nothing was measured; no table or charts written", flush=True)
    return 0
  table = report.readme_section(results)
  print(table)
  fallback = os.path.join(args.out, "table.md")
  written = (report.write_table(table, args.readme, fallback) if args.readme
             else report.write_table(table, "", fallback))
  charts = report.plot(results, args.out)
  print(f"table written to {written}; charts: {', '.join(charts)}; "
        f"total {results['wall_s']:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""W3's heaviest layer operations timed one by one, in jdeq and in PyTorch.

``python -m experiments.bench.op_costs [--batch 64] [--reps 5] [--rounds 2]
[--threads N] [--torch-python PATH | --no-torch] [--json PATH]``

For each operation of :data:`experiments.bench.workloads.W3_LAYER_OPS` (MDEQ-Tiny's
block convolutions at both resolutions, its stride-2 fusion convolution, its
GroupNorm + ReLU) it prints the forward and the input-VJP cost per call on both
sides and their ratio, the two sides alternating round by round under the
benchmark's conditions (threads, XLA flags, retained freed memory). It tells which
operations make up a gap between the two sides' whole-map costs, which
``python -m experiments.bench`` reports as their bare evaluations and VJPs.

jdeq's figures are per call inside a jitted loop, where solvers run the map;
PyTorch's are per eager call (NCHW, as the TorchDEQ port of MDEQ runs them).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from experiments.bench import jdeq_side, run, timing, workloads

DEFAULT_JSON = os.path.join(run.DEFAULT_OUT, "op_costs.json")


def torch_layer_op_costs(python: str, batch: int, reps: int, threads: int) -> dict:
  """:func:`torch_side.layer_op_costs` in a fresh process of the TorchDEQ environment.

  Raises:
    RuntimeError: if that process fails; the message ends with its error output.
  """
  env = dict(run.child_environment(retain_memory=True),
             JDEQ_BENCH_TORCH_THREADS=str(threads))
  return run.run_torch_side_once(python, "--layer-ops", {"batch": batch, "reps": reps},
                                 env)


def _median_over_rounds(rounds: list[dict]) -> dict[str, dict[str, float]]:
  return {op: {way: float(np.median([r[op][way] for r in rounds])) for way in rounds[0][op]}
          for op in rounds[0]}


def format_table(jdeq: dict, torch: dict | None) -> str:
  header = "| operation | jdeq fwd ms | jdeq VJP ms |"
  rule = "|---|---|---|"
  if torch:
    header += " PyTorch fwd ms | PyTorch VJP ms | fwd speedup | VJP speedup |"
    rule += "---|---|---|---|"
  lines = [header, rule]
  for op, figures in jdeq.items():
    line = f"| {op} | {figures['forward'] * 1e3:.1f} | {figures['vjp'] * 1e3:.1f} |"
    if torch:
      theirs = torch[op]
      line += (f" {theirs['forward'] * 1e3:.1f} | {theirs['vjp'] * 1e3:.1f} |"
               f" {theirs['forward'] / figures['forward']:.2f}x |"
               f" {theirs['vjp'] / figures['vjp']:.2f}x |")
    lines.append(line)
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=workloads.W3.batch)
  parser.add_argument("--reps", type=int, default=5, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=2, help="rounds per side")
  parser.add_argument("--threads", type=int, default=0,
                      help="cores, and so threads, for each side (0: all)")
  parser.add_argument("--xla-flags", default=run.DEFAULT_XLA_FLAGS,
                      help="appended to $XLA_FLAGS, as in the benchmark")
  parser.add_argument("--torch-python", default=run.default_torch_python())
  parser.add_argument("--no-torch", action="store_true", help="time the jdeq side only")
  parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the figures")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.reps < 1 or args.rounds < 1:
    parser.error("--batch, --reps and --rounds must be at least 1")

  conditions = run.configure_processes(args.threads, args.xla_flags)
  print(f"device: {jdeq_side.describe_device()}; {conditions['threads']} threads per "
        f"side; batch {args.batch}", flush=True)
  warning = timing.idle_warning()
  if warning:
    print(warning, flush=True)
  with_torch = not args.no_torch and os.path.exists(args.torch_python)
  if not args.no_torch and not with_torch:
    print(f"WARNING: no PyTorch interpreter at {args.torch_python!r}; timing jdeq only",
          flush=True)
  jdeq_rounds, torch_rounds = [], []
  for _ in range(args.rounds):
    jdeq_rounds.append(jdeq_side.layer_op_costs(args.batch, args.reps))
    if with_torch:
      torch_rounds.append(torch_layer_op_costs(args.torch_python, args.batch, args.reps,
                                               conditions["threads"]))
  result = {"conditions": conditions, "batch": args.batch,
            "jdeq": _median_over_rounds(jdeq_rounds),
            "torch": _median_over_rounds(torch_rounds) if torch_rounds else None,
            "rounds": {"jdeq": jdeq_rounds, "torch": torch_rounds}}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  timing.publish(format_table(result["jdeq"], result["torch"]), result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

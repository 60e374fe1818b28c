"""Where the time of one jdeq training step goes: an XLA profile grouped by phase and kind.

``python -m experiments.bench.profile_step --workload w2 --variant anderson/ift
[--function bare] [--threads N]`` compiles the benchmark's training step (or its
bare evaluations) under the benchmark's threads and XLA flags, traces a few calls
with ``jax.profiler`` and attributes the time of every executed XLA operation (its
own time: nested thunks, such as a while loop's body, are subtracted from their
parent) to

* a phase, from the operation's trace context: the forward solve loop, the IFT
  backward solve loop, or outside the loops (weight norm, injection, the
  linearization at ``z*``, the final VJP into the parameters, head, update);
* a kind, from the compiled HLO: convolution, matrix product, reduction,
  elementwise (loop fusions), in-place history update (dynamic-update-slice),
  copy, loop control.

It prints milliseconds per step for each (phase, kind) and the largest single
operations, so that the cost of the map (convolutions, GroupNorm) can be told apart
from the solver's own work (Anderson's mixing products, the residual bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

from experiments.bench import jdeq_side, run, timing

_NAME = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"^([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")


def _instruction(line: str):
  """``(name, opcode, rest of the line)`` of an HLO instruction line, else None."""
  named = _NAME.match(line)
  if not named:
    return None
  name, text = named.groups()
  end = 0
  if text.startswith("("):  # a tuple shape, which may hold spaces and parentheses
    depth = 0
    for end, char in enumerate(text):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
  space = text.find(" ", end)
  operation = _OPCODE.match(text[space + 1:]) if space >= 0 else None
  return (name,) + operation.groups() if operation else None


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """Instruction name → opcode, trace context, fused opcodes and enclosing loop.

  The enclosing loop is the outermost ``while`` whose body (or condition) reaches
  the instruction through called computations; its trace context tells the
  forward solve (``jvp()/while``) from the backward one (``transpose(...)/while``).
  """
  computations: dict[str, list[str]] = {}  # computation → opcodes it holds
  members, opcodes, operands = {}, {}, {}  # per instruction
  callers: dict[str, str] = {}  # computation → the instruction calling it
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      computations[current] = []
      continue
    parsed = _instruction(line)
    if parsed and current is not None:
      name, opcode, rest = parsed
      computations[current].append(opcode)
      members[name], opcodes[name], operands[name] = current, opcode, rest
      for callee in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", rest):
        callers.setdefault(callee, name)

  def context_of(name):
    found = re.search(r'op_name="([^"]*)"', operands[name])
    return found.group(1) if found else ""

  index = {}
  for name, rest in operands.items():
    loop, caller = None, callers.get(members[name])
    while caller is not None:
      if opcodes[caller] == "while":
        loop = caller
      caller = callers.get(members[caller])
    called = re.search(r"calls=%([\w.\-]+)", rest)
    index[name] = {"opcode": opcodes[name],
                   "fused": computations.get(called.group(1), []) if called else [],
                   "context": context_of(name),
                   "loop": None if loop is None else context_of(loop) or "while"}
  return index


def kind_of(info: dict | None) -> str:
  """A coarse kind of an executed operation (see the module docstring)."""
  if info is None:
    return "other"
  ops = set(info["fused"]) | {info["opcode"]}
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "matrix product"
  if info["opcode"] in ("while", "conditional", "call"):
    return "loop control"
  if "dynamic-update-slice" in ops or "scatter" in ops:
    return "history update"
  if "reduce" in ops:
    return "reduction"
  if info["opcode"] == "copy" or ops <= {"copy", "bitcast", "parameter"}:
    return "copy"
  return "elementwise"


def phase_of(info: dict | None) -> str:
  """Forward solve loop, backward solve loop or outside the loops."""
  loop = (info or {}).get("loop")
  if loop is None:
    return "outside loops"
  return "backward loop" if "transpose(" in loop else "forward loop"


def _self_times(events: list[dict]) -> dict[str, list[float]]:
  """Exclusive microseconds of each complete event, per name (children subtracted)."""
  by_thread = collections.defaultdict(list)
  for event in events:
    if event.get("ph") == "X" and "dur" in event:
      by_thread[(event.get("pid"), event.get("tid"))].append(event)
  totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack: list[list] = []  # [event, child time]
    def close(entry):
      event, children = entry
      totals[event["name"]][0] += 1
      totals[event["name"]][1] += event["dur"] - children
      if stack:
        stack[-1][1] += event["dur"]
    for event in thread_events:
      while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= event["ts"]:
        close(stack.pop())
      stack.append([event, 0.0])
    while stack:
      close(stack.pop())
  return totals


def profile(workload: str, variant: str, steps: int = 3, function: str = "step",
            built: jdeq_side.Variant | None = None) -> dict:
  """Traces ``steps`` calls; returns ms per call by (phase, kind) and by operation.

  Args:
    workload: ``"w1"``, ``"w2"`` or ``"w3"``.
    variant: e.g. ``"anderson/ift"``.
    steps: traced calls.
    function: ``"step"`` (the training step) or ``"bare"`` (the same number of
      bare map evaluations and VJPs, the overhead ratio's denominator).
    built: an already built variant (reused across calls of this function).
  """
  if built is None:
    built = jdeq_side.build_variant(workload, variant)
  if built.compiled_step is None:
    built.compile_step()
  if function == "step":
    compiled = built.compiled_step
  else:
    compiled = built.bare.lower(built.cell.params, built.cell.batch).compile()
  index = hlo_index(compiled.as_text())
  call = built.calls()[function]
  for _ in range(2):
    call()
  wall = timing.time_calls(call, reps=steps, warmup=0).median
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        call()
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  grouped: dict[tuple[str, str], float] = collections.defaultdict(float)
  ops = {}
  for name, (count, micros) in _self_times(events).items():
    if name not in index:
      continue  # host-side events: Python, dispatch, the executor itself
    ms = micros / 1e3 / steps
    grouped[(phase_of(index[name]), kind_of(index[name]))] += ms
    ops[name] = {"ms_per_step": ms, "calls_per_step": count / steps,
                 "kind": kind_of(index[name]), "phase": phase_of(index[name]),
                 "context": index[name]["context"]}
  return {"workload": workload, "variant": variant, "function": function,
          "wall_ms": wall * 1e3,
          "grouped": {f"{p} / {k}": ms for (p, k), ms in sorted(grouped.items())},
          "ops": dict(sorted(ops.items(), key=lambda item: -item[1]["ms_per_step"]))}


def format_profile(result: dict, top: int = 15) -> str:
  lines = [f"{result['workload']} {result['variant']} {result['function']}: "
           f"{result['wall_ms']:.1f} ms (wall, median); XLA operation time per call:"]
  total = sum(result["grouped"].values())
  for key, ms in sorted(result["grouped"].items(), key=lambda item: -item[1]):
    lines.append(f"  {key:<42} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
  lines.append(f"  {'total':<42} {total:9.2f} ms")
  lines.append("largest operations (ms and executions per call):")
  for name, op in list(result["ops"].items())[:top]:
    lines.append(f"  {op['ms_per_step']:8.2f} {op['calls_per_step']:5.0f}  {name:<36} "
                 f"{op['phase']} / {op['kind']}  [{op['context'][-60:]}]")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", default="w2")
  parser.add_argument("--variant", default="anderson/ift")
  parser.add_argument("--function", default="step", choices=("step", "bare"))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--threads", type=int, default=0,
                      help="cores to run on, as in the benchmark (0: all)")
  parser.add_argument("--xla-flags", default=run.DEFAULT_XLA_FLAGS,
                      help="appended to $XLA_FLAGS, as in the benchmark")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args(argv)
  conditions = run.configure_processes(args.threads, args.xla_flags)
  print(f"{conditions['threads']} threads; XLA_FLAGS={conditions['xla_flags']!r}")
  warning = timing.idle_warning()
  if warning:
    print(warning, file=sys.stderr)
  result = profile(args.workload, args.variant, args.steps, args.function)
  timing.publish(format_profile(result, args.top), result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Turns benchmark results into a markdown table, the README block and PNG charts."""

from __future__ import annotations

import os
import re
from typing import Any

from experiments.bench import workloads

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def _ms(seconds: float | None) -> str:
  return "–" if seconds is None else f"{seconds * 1e3:.3g}"


def _ratio(value: float | None) -> str:
  return "–" if value is None else f"{value:.2f}"


def _spread(timing: dict | None) -> str:
  """``median (p25–p75)`` in milliseconds."""
  if not timing:
    return "–"
  return f"{_ms(timing['median'])} ({_ms(timing['p25'])}–{_ms(timing['p75'])})"


def _residual(counts: dict) -> str:
  value = counts.get("forward_rel_residual")
  return "–" if value is None else f"{value:.1e}"


def _yes_no(flag: bool | None) -> str:
  return "–" if flag is None else ("yes" if flag else "no")


def markdown_table(results: dict[str, Any]) -> str:
  """One row per workload × variant: medians and the TorchDEQ/jdeq speedups."""
  conditions = results.get("conditions", {})
  runs = sorted({c.get("reps", 0) * c.get("rounds", 0) for c in results["cells"]})
  lines = [
      f"Device: {results['device']}; TorchDEQ side: {results.get('torch_device', 'not run')}. "
      f"Threads per side: {conditions.get('threads', '?')}; XLA_FLAGS: "
      f"`{conditions.get('xla_flags') or '(none)'}`; glibc malloc keeps freed memory "
      f"for reuse: jdeq {_yes_no(conditions.get('retained_freed_memory'))}, TorchDEQ "
      f"{_yes_no(conditions.get('torch_retained_freed_memory'))}. "
      f"1-min load average at start "
      f"{results['load']['load1']:.2f} on {results['load']['cores']} cores; runs per "
      f"measure: {'/'.join(map(str, runs)) or '?'}.",
      "",
      "| workload | variant | jdeq step ms (p25–p75) | TorchDEQ step ms (p25–p75) "
      "| step speedup | fwd speedup | bwd speedup | jdeq overhead | TorchDEQ overhead "
      "| jdeq compile s | jdeq temp MiB | NFE fwd/bwd | fwd rel. residual jdeq / TorchDEQ |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for cell in results["cells"]:
    jd, th = cell["jdeq"], cell.get("torch") or {}
    speed = cell.get("speedup", {})
    counts = jd.get("counts", {})
    nfe = f"{counts.get('forward_evaluations', '?')}/{counts.get('backward_vjps', '–')}"
    temp = jd["compile"].get("temp_bytes")
    lines.append(
        f"| {cell['workload']} | {cell['variant']} | {_spread(jd['timings']['step'])} "
        f"| {_spread(th.get('timings', {}).get('step'))} "
        f"| {_ratio(speed.get('step'))}× | {_ratio(speed.get('forward'))}× "
        f"| {_ratio(speed.get('backward'))}× | {_ratio(jd.get('overhead'))} "
        f"| {_ratio(th.get('overhead'))} | {jd['compile']['compile_s']:.1f} "
        f"| {'–' if temp is None else f'{temp / 2**20:.1f}'} | {nfe} "
        f"| {_residual(counts)} / {_residual(th.get('counts', {}))} |")
  lines += [
      "",
      "Speedup = TorchDEQ median / jdeq median (> 1: jdeq faster). Overhead = step time / "
      "time of the same number of bare map evaluations and VJPs in the same framework. "
      "jdeq temp = XLA's compile-time temporary buffer of the step (its peak working "
      "memory beyond parameters and inputs).",
  ]
  if results.get("memory"):
    lines += ["", "Peak memory of one training step (jdeq: XLA compile-time temp buffer "
              "size; TorchDEQ: bytes autograd saves for backward, and the process's peak "
              "RSS rise):", "",
              "| workload | variant | forward budget | jdeq temp MiB | TorchDEQ saved MiB "
              "| TorchDEQ RSS rise MiB |", "|---|---|---|---|---|---|"]
    for row in results["memory"]:
      th = row.get("torch") or {}
      mib = lambda b: "–" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
      lines.append(f"| {row['workload']} | {row['variant']} | {row['forward_iters']} "
                   f"| {mib(row['jdeq_temp_bytes'])} | {mib(th.get('saved_bytes'))} "
                   f"| {mib(th.get('rss_delta_bytes'))} |")
  return "\n".join(lines)


def readme_section(results: dict[str, Any]) -> str:
  """The README's Benchmarks section: what was run, under which conditions, the table."""
  names = sorted({c["workload"] for c in results["cells"]})
  described = "; ".join(
      f"{n.upper()}: {workloads.workload(n).title}, batch {workloads.workload(n).batch}, "
      f"{workloads.workload(n).forward_iters}/{workloads.workload(n).backward_iters} "
      "forward/backward iterations" for n in names)
  intro = (
      "`python -m experiments.bench` runs solver × gradient variants on identical "
      "workloads in jdeq and TorchDEQ 0.1.0 (TorchDEQ in its own environment from "
      "`requirements-bench.txt`, in a subprocess, the two sides alternating round by "
      "round), every solve running its full budget, and prints the device. "
      f"{described}. The full training step is forward solve + backward + SGD "
      "update; both sides run with the same number of threads. Charts and the raw "
      "figures (JSON) are written to `experiments/bench/results/`; "
      "`docs/benchmarks.md` records where a step's time goes.")
  return "## Benchmarks\n\n" + intro + "\n\n" + markdown_table(results)


def write_table(table: str, readme_path: str, fallback_path: str) -> str:
  """Writes ``table`` between the README markers, or to ``fallback_path`` without them.

  Returns:
    The path written.
  """
  if os.path.exists(readme_path):
    with open(readme_path) as f:
      text = f.read()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if pattern.search(text):
      block = f"{README_START}\n{table}\n{README_END}"
      with open(readme_path, "w") as f:
        f.write(pattern.sub(lambda _: block, text, count=1))
      return readme_path
  with open(fallback_path, "w") as f:
    f.write(table + "\n")
  return fallback_path


def plot(results: dict[str, Any], out_dir: str) -> list[str]:
  """Bar charts of step/forward/backward medians per workload, and memory scaling."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for workload in sorted({c["workload"] for c in results["cells"]}):
    cells = [c for c in results["cells"] if c["workload"] == workload]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, measure in zip(axes, ("step", "forward", "backward")):
      names = [c["variant"] for c in cells]
      positions = range(len(names))
      for offset, side, color in ((-0.2, "jdeq", "tab:blue"), (0.2, "torch", "tab:orange")):
        medians, errors = [], [[], []]
        for c in cells:
          t = ((c.get(side) or {}).get("timings") or {}).get(measure)
          m = t["median"] * 1e3 if t else 0.0
          medians.append(m)
          errors[0].append(m - t["p25"] * 1e3 if t else 0.0)
          errors[1].append(t["p75"] * 1e3 - m if t else 0.0)
        ax.bar([p + offset for p in positions], medians, 0.4, yerr=errors,
               label="jdeq" if side == "jdeq" else "TorchDEQ", color=color)
      ax.set_xticks(list(positions))
      ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
      ax.set_yscale("log")
      ax.set_ylabel("ms (median, p25–p75)")
      ax.set_title(f"{workload}: {measure}")
      ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{workload}_times.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  if results.get("memory"):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for row in results["memory"]:
      key = (row["workload"], row["variant"])
      series.setdefault(key, []).append(row)
    for (workload, variant), rows in series.items():
      budgets = [r["forward_iters"] for r in rows]
      ax.plot(budgets, [r["jdeq_temp_bytes"] / 2**20 for r in rows], "o-",
              label=f"jdeq {workload} {variant} (temp)")
      if all(r.get("torch") for r in rows):
        ax.plot(budgets, [r["torch"]["saved_bytes"] / 2**20 for r in rows], "s--",
                label=f"TorchDEQ {workload} {variant} (saved)")
    ax.set_xlabel("forward budget (iterations)")
    ax.set_ylabel("MiB")
    ax.set_yscale("log")
    ax.set_title("Training-step memory vs forward budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "memory_scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths

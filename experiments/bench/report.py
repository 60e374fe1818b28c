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


def _is_reference(cell: dict) -> bool:
  """Whether a cell is w3ref's (jdeq against the authors' code, not TorchDEQ)."""
  return cell["workload"] == workloads.W3REF.name


def nfe_pair(counts: dict) -> str:
  """``forward/backward`` solver NFE of a counts dict (``–``: no backward solve)."""
  backward = counts.get("backward_vjps")
  forward = counts.get("forward_evaluations", "?")
  return f"{forward}/{'–' if backward is None else backward}"


def reference_table(cells: list[dict]) -> list[str]:
  """Lines of the w3ref table: one row per step kind, reference/jdeq ratios."""
  lines = [
      "jdeq vs the authors' code (locuslab/deq MDEQ-Vision; w3ref): MDEQ-Tiny, "
      "batch 64, each side's own training step — jdeq's `make_train_step` as its "
      "training loop compiles it, the reference's `cls_function.train` step — with "
      f"Adam 1e-3, Broyden {workloads.W3REF.forward_iters}/"
      f"{workloads.W3REF.backward_iters} steps at tolerance 1e-3 (equilibrium) or 10 "
      "unrolled layers (pretraining), dropout 0.25, on the same batch:", "",
      "| step | jdeq ms (p25–p75) | reference ms (p25–p75) | reference / jdeq "
      "| NFE fwd/bwd jdeq | NFE fwd/bwd reference | fwd rel. residual jdeq / reference "
      "| parameters |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for cell in cells:
    jd, ref = cell["jdeq"], cell.get("reference") or {}
    lines.append(
        f"| {cell['variant']} | {_spread(jd['timings']['step'])} "
        f"| {_spread(ref.get('timings', {}).get('step'))} "
        f"| {_ratio(cell.get('ratio', {}).get('step'))}× "
        f"| {nfe_pair(jd.get('counts', {}))} | {nfe_pair(ref.get('counts', {}))} "
        f"| {_residual(jd.get('counts', {}))} / {_residual(ref.get('counts', {}))} "
        f"| {cell['parameters']:,} / "
        f"{cell.get('reference_parameters', 0):,} |")
  lines += ["", "Ratio > 1: jdeq faster. NFE: map evaluations of the forward solve "
            "(of the unrolled layers in pretraining) / VJPs of the backward solve, "
            "after the timed steps; residuals batch-wide, the reference's stopping "
            "quantity. Each side trains on (the parameters move from step to step); "
            "the weights are each framework's own initialization."]
  return lines


def markdown_table(results: dict[str, Any]) -> str:
  """One row per workload × variant: medians and the TorchDEQ/jdeq speedups (and
  w3ref's table, jdeq against the authors' code, when it ran)."""
  conditions = results.get("conditions", {})
  runs = sorted({c.get("reps", 0) * c.get("rounds", 0) for c in results["cells"]})
  lines = [
      f"Device: {results['device']}; TorchDEQ side: {results.get('torch_device', 'not run')}. "
      f"Threads per side: {conditions.get('threads', '?')}; XLA_FLAGS: "
      f"`{conditions.get('xla_flags') or '(none)'}`; jdeq's convolution weight "
      f"gradient: {conditions.get('weight_gradient', '?')}; glibc malloc keeps freed memory "
      f"for reuse: jdeq {_yes_no(conditions.get('retained_freed_memory'))}, TorchDEQ "
      f"{_yes_no(conditions.get('torch_retained_freed_memory'))}. "
      f"1-min load average at start "
      f"{results['load']['load1']:.2f} on {results['load']['cores']} cores; runs per "
      f"measure: {'/'.join(map(str, runs)) or '?'}.",
  ]
  torch_cells = [c for c in results["cells"] if not _is_reference(c)]
  if torch_cells:
    lines += [
        "",
        "| workload | variant | jdeq step ms (p25–p75) | TorchDEQ step ms (p25–p75) "
        "| step speedup | fwd speedup | bwd speedup | jdeq overhead | TorchDEQ overhead "
        "| jdeq compile s | jdeq temp MiB | NFE fwd/bwd | fwd rel. residual jdeq / TorchDEQ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
  for cell in torch_cells:
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
  if torch_cells:
    lines += [
        "",
        "Speedup = TorchDEQ median / jdeq median (> 1: jdeq faster). Overhead = step "
        "time / time of the same number of bare map evaluations and VJPs in the same "
        "framework. jdeq temp = XLA's compile-time temporary buffer of the step (its "
        "peak working memory beyond parameters and inputs).",
    ]
  reference_cells = [c for c in results["cells"] if _is_reference(c)]
  if reference_cells:
    lines += [""] + reference_table(reference_cells)
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
  names = sorted({c["workload"] for c in results["cells"] if not _is_reference(c)})
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
  paragraphs = [intro] if names else []
  if any(_is_reference(c) for c in results["cells"]):
    paragraphs.append(
        "`python -m experiments.bench --workloads w3ref --reference-dir DEQ` (DEQ a "
        "checkout of locuslab/deq, run unmodified by a Python given by "
        "`--reference-python`) times MDEQ-Tiny's equilibrium and pretraining steps in "
        "jdeq and in the authors' own code, alternating round by round (reference "
        f"side: {results.get('reference_device', '?')}).")
  return "## Benchmarks\n\n" + "\n\n".join(paragraphs + [markdown_table(results)])


def replace_between_markers(text_path: str, content: str, start: str, end: str) -> bool:
  """Replaces what lies between the markers ``start`` and ``end`` in a text file.

  Returns:
    Whether the file exists and has both markers (nothing is written otherwise).
  """
  if not text_path or not os.path.exists(text_path):
    return False
  with open(text_path) as f:
    text = f.read()
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  if not pattern.search(text):
    return False
  with open(text_path, "w") as f:
    f.write(pattern.sub(lambda _: f"{start}\n{content}\n{end}", text, count=1))
  return True


def write_table(table: str, readme_path: str, fallback_path: str) -> str:
  """Writes ``table`` between the README markers, or to ``fallback_path`` without them.

  Returns:
    The path written.
  """
  if replace_between_markers(readme_path, table, README_START, README_END):
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
    # w3ref times whole training steps only, against the authors' code.
    reference = workload == workloads.W3REF.name
    measures = ("step",) if reference else ("step", "forward", "backward")
    other, other_label = (("reference", "authors' code") if reference
                          else ("torch", "TorchDEQ"))
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4.5),
                             sharey=False, squeeze=False)
    for ax, measure in zip(axes[0], measures):
      names = [c["variant"] for c in cells]
      positions = range(len(names))
      for offset, side, color in ((-0.2, "jdeq", "tab:blue"), (0.2, other, "tab:orange")):
        medians, errors = [], [[], []]
        for c in cells:
          t = ((c.get(side) or {}).get("timings") or {}).get(measure)
          m = t["median"] * 1e3 if t else 0.0
          medians.append(m)
          errors[0].append(m - t["p25"] * 1e3 if t else 0.0)
          errors[1].append(t["p75"] * 1e3 - m if t else 0.0)
        ax.bar([p + offset for p in positions], medians, 0.4, yerr=errors,
               label="jdeq" if side == "jdeq" else other_label, color=color)
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

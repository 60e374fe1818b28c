"""Time to tolerance: jdeq's per-sample stopping against TorchDEQ's batch-wide stopping.

``python -m experiments.bench.tolerance`` solves one batch of fixed-point problems
whose samples converge at very different rates, forward only (no gradients), to a
relative tolerance ``‖f(z) − z‖ / ‖f(z)‖ <= tol`` with a generous budget, and
reports per solver × tolerance × side: the wall-clock time to tolerance, the map
evaluations (NFE) each sample got, and the per-sample residuals it ended with.

Workload. Per sample ``i`` (batch ``B = 64``, width ``d = 64``),

  f(z)_i = tanh(s_i · W z_i + U x_i),

with ``W`` a random orthogonal matrix (every singular value 1, so sample ``i``'s map
is ``s_i``-Lipschitz in every direction), ``U`` Gaussian with gain 0.1 (a small
injection keeps ``tanh`` near its linear range, ``tanh' ≈ 1``, so the contraction
factor really is ``≈ s_i``), ``x_i`` standard normal, and ``1 − s_i`` spaced
geometrically from 0.7 to 0.03 (``s_i`` from 0.3 to 0.97). Plain iteration needs
about ``ln(1/tol) / (1 − s_i)`` evaluations, so the NFE per sample spread roughly
log-uniformly, from 7 to ~100 at ``tol = 1e-3`` (9 to ~140 at ``1e-4``, well inside
the default budget of 300); with an orthogonal ``W`` the
spectrum of the Jacobian surrounds the origin, where Anderson with a short history
accelerates little, so Anderson and Broyden keep a wide spread too. The arrays are
drawn in NumPy (:func:`tolerance_arrays`) and handed to the PyTorch side as a file,
so both sides solve the identical problem.

Sides (the rows of the table):

* ``jdeq``: ``jdeq.fixed_point`` jitted, compiled once; each sample stops when its
  own residual meets ``tol`` (``stats.nstep`` is its NFE). The batched
  ``lax.while_loop`` still evaluates the map on the whole batch until the slowest
  sample has stopped: a stopped sample's evaluations are computed and discarded.
* ``jdeq, all to K``: the same solver with no stopping (``tol = 1e-30``) and the
  budget ``K`` = the loop length of the ``jdeq`` row, i.e. batch-wide stopping at
  the same step. It tells what per-sample stopping costs or saves in wall time.
* ``TorchDEQ``: ``torchdeq.get_deq`` with ``f_tol``, ``f_stop_mode="rel"`` and the
  same budget, in eval mode under ``no_grad`` (:mod:`experiments.bench.torch_tolerance`,
  a subprocess in the TorchDEQ environment). It stops the batch at the first step
  where every sample's current residual is below ``tol``, so every sample's NFE is
  the batch's count; its residual traces give when each sample first met ``tol``.
* ``reference`` (Broyden only, with ``--reference-dir``): the DEQ authors' own
  ``broyden`` from a checkout of their repository, which stops on one residual of
  the whole batch.

Columns: ``batched evals`` = evaluations of the map on the whole batch (the loop
length ``K``); ``needed share`` = ``Σᵢ hᵢ / (B · K)``, with ``hᵢ`` the evaluation at
which sample ``i`` first met ``tol`` (``K`` if it never did): the share of the
loop's per-sample evaluations that a sample still needed. Residuals are recomputed
in float64 NumPy at the states each side returns (one yardstick for all sides).

Timing: per cell every side is set up (jdeq compiled, all sides warmed up), then
timed in alternating rounds (jdeq, jdeq all to K, TorchDEQ, reference; ``--rounds``
rounds of ``--reps`` solves); the figure is the median over all timed solves. Both
processes run with the same number of threads (``--threads``, default 1: the
problem is small, and a second thread mostly measures the machine's other load).

Outputs (``--out``, default ``experiments/bench/results``): ``tolerance.md`` (the
table, also printed), ``tolerance.json``, ``tolerance_nfe.png`` (ECDFs of the
per-sample NFE); the table also goes into README.md between
``<!-- tolerance:start -->`` and ``<!-- tolerance:end -->`` if both markers exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from experiments.bench import report, run, timing, workloads

README_START = "<!-- tolerance:start -->"
README_END = "<!-- tolerance:end -->"
SOLVERS = workloads.SOLVERS
TOLERANCES = (1e-3, 1e-4)
BUDGET = 300
BATCH = 64
DIM = 64
SCALE_MIN = 0.3
SCALE_MAX = 0.97
INJECTION_GAIN = 0.1
# TorchDEQ's default history; the PyTorch worker relies on it (it passes no m).
ANDERSON_MEMORY = 6
SIDES = ("jdeq", "jdeq_all_k", "torchdeq", "reference")
SIDE_TITLES = {"jdeq": "jdeq", "jdeq_all_k": "jdeq, all to K", "torchdeq": "TorchDEQ",
               "reference": "reference"}
WORKLOAD_TITLE = (f"f(z)_i = tanh(s_i W z_i + U x_i), W orthogonal, U gain "
                  f"{INJECTION_GAIN}, 1 - s_i geometric from {1 - SCALE_MIN:.2g} to "
                  f"{1 - SCALE_MAX:.2g}")


def tolerance_arrays(batch: int = BATCH, dim: int = DIM, seed: int = 0
                     ) -> dict[str, np.ndarray]:
  """The shared float32 arrays of the workload, from ``np.random.default_rng(seed)``.

  Returns:
    ``W`` (d, d) orthogonal (Haar: the Q of a Gaussian matrix's QR, signs fixed by
    R's diagonal), ``U`` (d, d) with entries ``N(0, gain² / d)``, ``x`` (B, d)
    standard normal, and ``scale`` (B,) with ``1 − s_i = (1 − s_min) ·
    ((1 − s_max) / (1 − s_min))^(i / (B − 1))``, increasing from ``s_min`` to
    ``s_max``.
  """
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  w = q * np.sign(np.diag(r))[None, :]
  u_mat = INJECTION_GAIN / np.sqrt(dim) * rng.standard_normal((dim, dim))
  x = rng.standard_normal((batch, dim))
  ratio = (1 - SCALE_MAX) / (1 - SCALE_MIN)
  scale = 1 - (1 - SCALE_MIN) * ratio**np.linspace(0.0, 1.0, batch)
  return {"W": w.astype(np.float32), "U": u_mat.astype(np.float32),
          "x": x.astype(np.float32), "scale": scale.astype(np.float32)}


def relative_residuals(arrays: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
  """``‖f(z_i) − z_i‖ / ‖f(z_i)‖`` per sample, in float64 (the common yardstick)."""
  w, u_mat, x, scale = (np.asarray(arrays[k], np.float64) for k in ("W", "U", "x", "scale"))
  z = np.asarray(z, np.float64)
  fz = np.tanh(scale[:, None] * (z @ w.T) + x @ u_mat.T)
  return np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)


# ----------------------------------------------------------------------------- jdeq

def _map(z, w, u, scale):
  return jnp.tanh(scale[:, None] * (z @ w.T) + u)


def jdeq_solver(name: str, tol: float, budget: int) -> jdeq.AbstractSolver:
  """The jdeq solver ``name`` with relative stopping, configured as TorchDEQ's."""
  options = dict(max_iter=budget, tol=tol, stop_mode="rel")
  if name == "anderson":
    return jdeq.Anderson(m=ANDERSON_MEMORY, **options)
  if name == "broyden":
    return jdeq.Broyden(memory=budget, **options)  # TorchDEQ keeps every update
  if name == "fixed_point_iteration":
    return jdeq.FixedPointIteration(**options)
  raise ValueError(f"unknown solver {name!r}; valid solvers are {list(SOLVERS)}")


def compile_solve(arrays: dict[str, np.ndarray], solver: jdeq.AbstractSolver,
                  traced_budget: bool = False) -> tuple[Callable, tuple, float]:
  """The forward solve ``(W, U, x, scale[, budget]) -> (z*, stats)``, compiled once.

  Returns:
    ``(compiled, arguments, compile seconds)``; with ``traced_budget`` the last
    argument is the evaluation budget (an int32 scalar: one compilation serves
    every budget), set to ``solver.max_iter`` in the returned arguments.
  """
  def solve(w, u_mat, x, scale, *budget):
    u = x @ u_mat.T  # the injection, once per solve (as on the PyTorch side)
    return jdeq.fixed_point(_map, jnp.zeros_like(u), w, u, scale, solver=solver,
                            budget=budget[0] if budget else None)

  args = tuple(jnp.asarray(arrays[k]) for k in ("W", "U", "x", "scale"))
  if traced_budget:
    args += (jnp.asarray(solver.max_iter, jnp.int32),)
  start = time.perf_counter()
  compiled = jax.jit(solve).lower(*args).compile()
  return compiled, args, time.perf_counter() - start


def jdeq_figures(arrays, z, stats, tol: float, per_sample: bool) -> dict:
  """What one jdeq solve did: NFE, first hits, residuals (see :func:`summarize`)."""
  nstep = np.asarray(stats.nstep).astype(int)
  converged = np.asarray(stats.converged)
  return {
      "batched_evaluations": int(nstep.max()),
      "nfe": nstep.tolist(),
      # A sample that stopped on its own met the tolerance at its last evaluation.
      "hit_nfe": ([int(n) if c else None for n, c in zip(nstep, converged)]
                  if per_sample else None),
      "rel_residual": relative_residuals(arrays, np.asarray(z)).tolist(),
      "reported_rel_residual": np.asarray(stats.rel_residual).tolist(),
      "reported_converged": converged.tolist(),
      "diverged": int(np.sum(np.asarray(stats.diverged))),
  }


# ---------------------------------------------------------------- PyTorch worker

def start_worker(python: str, side: str, threads: int,
                 reference_root: str | None = None) -> run.TorchWorker:
  """A :mod:`experiments.bench.torch_tolerance` subprocess for ``side``."""
  arguments = ("--side", side, "--threads", str(threads))
  if reference_root:
    arguments += ("--reference-root", reference_root)
  return run.TorchWorker(python, threads, retain_memory=True,
                         module="experiments.bench.torch_tolerance", label=side,
                         arguments=arguments)


def worker_figures(arrays, reply: dict) -> dict:
  """A worker's ``stats`` reply as side figures: every sample gets the batch's NFE."""
  batch = len(reply["z"])
  figures = {
      "batched_evaluations": reply["evaluations"],
      "nfe": [reply["evaluations"]] * batch,
      "hit_nfe": reply.get("hit_nfe"),
      "rel_residual": relative_residuals(arrays, np.asarray(reply["z"])).tolist(),
      "reported_rel_residual": reply.get("reported_rel_residual"),
      "reported_nstep": reply.get("reported_nstep"),
  }
  for key in ("batch_rel_residual", "protective_break"):
    if key in reply:
      figures[key] = reply[key]
  return figures


def reference_root(directory: str) -> str:
  """The directory holding ``lib/solvers.py`` in a checkout of the DEQ authors' code.

  Accepts the checkout's root, its ``MDEQ-Vision`` (or ``DEQ-Sequence``) folder, or
  the ``lib`` folder itself.

  Raises:
    ValueError: if none of these layouts has ``lib/solvers.py``.
  """
  directory = os.path.abspath(directory)
  for root in (directory, os.path.dirname(directory),
               os.path.join(directory, "MDEQ-Vision")):
    if os.path.isfile(os.path.join(root, "lib", "solvers.py")):
      return root
  raise ValueError(f"no lib/solvers.py in or next to {directory!r}: pass a checkout "
                   "of the DEQ authors' repository (locuslab/deq) as --reference-dir")


# ------------------------------------------------------------------------ figures

def summarize(side: dict, tol: float) -> dict:
  """The table's figures of one side.

  With ``nᵢ`` the NFE of sample ``i``, ``K`` the batched evaluations, ``hᵢ`` the
  evaluation at which sample ``i`` first met ``tol`` (``K`` where it never did or is
  unknown per sample) and ``rᵢ`` its recomputed relative residual:
  NFE median/min/max/mean of ``nᵢ``; ``needed_share = Σᵢ hᵢ / (B · K)`` (None when
  the side has no per-sample hits); residual median and max of ``rᵢ``;
  ``converged_share`` = share of ``rᵢ <= tol · (1 + 1e-2)`` (the slack absorbs the
  float32 rounding of the solver's own residual, which it compared with ``tol``);
  ``ms_per_batched_evaluation`` = median wall time / ``K``.
  """
  nfe = np.asarray(side["nfe"], float)
  residual = np.asarray(side["rel_residual"], float)
  batched = side["batched_evaluations"]
  hits = side.get("hit_nfe")
  needed = None
  if hits is not None:
    needed = float(sum(batched if h is None else h for h in hits) / (len(hits) * batched))
  median_s = (side.get("timing") or {}).get("median")
  return {
      "nfe_median": float(np.median(nfe)), "nfe_min": int(nfe.min()),
      "nfe_max": int(nfe.max()), "nfe_mean": float(nfe.mean()),
      "batched_evaluations": batched, "needed_share": needed,
      "residual_median": float(np.median(residual)), "residual_max": float(residual.max()),
      "converged_share": float(np.mean(residual <= tol * (1 + 1e-2))),
      "ms_per_batched_evaluation": (None if median_s is None
                                    else median_s * 1e3 / max(batched, 1)),
  }


def _ms(timing_dict: dict | None) -> str:
  if not timing_dict:
    return "–"
  return (f"{timing_dict['median'] * 1e3:.3g} ({timing_dict['p25'] * 1e3:.3g}–"
          f"{timing_dict['p75'] * 1e3:.3g})")


def _hits_range(hits: list | None) -> str:
  known = [h for h in hits or () if h is not None]
  if not known:
    return ""
  return f"; first met tol {int(np.median(known))} ({min(known)}–{max(known)})"


def compare(a: dict, b: dict) -> int:
  """-1 if timing ``a`` is faster than ``b``, 1 if slower, 0 if their IQRs overlap."""
  if a["p75"] < b["p25"]:
    return -1
  if a["p25"] > b["p75"]:
    return 1
  return 0


def findings(cell: dict) -> str:
  """One sentence per cell: what per-sample stopping bought, in NFE and in time."""
  sides = cell["sides"]
  jd = sides["jdeq"]
  s = jd["summary"]
  text = (f"{cell['solver']}, tol {cell['tol']:g}: jdeq stopped its samples after "
          f"{s['nfe_min']}–{s['nfe_max']} evaluations (median {s['nfe_median']:g}), "
          f"but its batched loop ran {s['batched_evaluations']} (needed share "
          f"{s['needed_share']:.2f})")
  all_k = sides.get("jdeq_all_k")
  if all_k:
    verdict = {-1: "per-sample stopping was faster", 1: "per-sample stopping was slower",
               0: "per-sample stopping saved no wall time: the interquartile ranges "
                  "overlap"}[compare(jd["timing"], all_k["timing"])]
    text += (f"; running every sample to {s['batched_evaluations']} took "
             f"{all_k['timing']['median'] * 1e3:.3g} ms against "
             f"{jd['timing']['median'] * 1e3:.3g} ms ({verdict}; the early samples "
             f"then end at residual median {all_k['summary']['residual_median']:.1e} "
             f"instead of {s['residual_median']:.1e})")
  for key in ("torchdeq", "reference"):
    other = sides.get(key)
    if other:
      o = other["summary"]
      text += (f". {SIDE_TITLES[key]} stopped the batch after "
               f"{o['batched_evaluations']} evaluations{_hits_range(other.get('hit_nfe'))}"
               f", {o['converged_share']:.0%} of samples at tol; jdeq took "
               f"{jd['timing']['median'] / other['timing']['median']:.2g}× its time")
  return text + "."


def overview(results: dict[str, Any]) -> str:
  """The conclusions over all cells: wall time, NFE, residuals, per-sample stopping's share."""
  cells = [c for c in results["cells"] if "jdeq_all_k" in c["sides"]]
  if not cells:
    return ""
  ratios = [c["sides"]["jdeq"]["timing"]["median"] / c["sides"]["jdeq_all_k"]["timing"]["median"]
            for c in cells]
  verdicts = [compare(c["sides"]["jdeq"]["timing"], c["sides"]["jdeq_all_k"]["timing"])
              for c in cells]
  shares = [c["sides"]["jdeq"]["summary"]["needed_share"] for c in cells]
  text = (f"Wall time: jdeq's batched loop runs until its slowest sample has stopped, and "
          f"the per-sample solve took {min(ratios):.2f}–{max(ratios):.2f}× the time of "
          f"running every sample to that same count"
          + (", with overlapping interquartile ranges in every cell: batch-wide "
             "stopping is as fast here" if verdicts.count(0) == len(cells) else
             f"; their interquartile ranges overlap in {verdicts.count(0)} of "
             f"{len(cells)} cells, per-sample stopping was faster in "
             f"{verdicts.count(-1)} and slower in {verdicts.count(1)}")
          + ". What per-sample stopping bought is "
          + ("accounting, not time" if -1 not in verdicts else "mostly accounting")
          + f": the samples needed {min(shares):.0%}–{max(shares):.0%} of the loop's "
          "per-sample evaluations; the rest were computed for samples that had already "
          "stopped and discarded, a saving that only removing stopped samples from the "
          "batch would turn into time. Batch-wide stopping instead over-solves the early "
          "samples" + (" at no extra cost." if -1 not in verdicts else "."))
  reference = [c["sides"]["reference"]["summary"]["converged_share"]
               for c in results["cells"] if "reference" in c["sides"]]
  if reference:
    per_sample = min(c["sides"][k]["summary"]["converged_share"] for c in results["cells"]
                     for k in ("jdeq", "torchdeq") if k in c["sides"])
    text += (f" Per-sample residuals: the reference's single whole-batch residual let up "
             f"to {1 - min(reference):.0%} of the samples end above the tolerance; with "
             f"per-sample criteria (jdeq's, and TorchDEQ's maximum over samples) "
             + ("none did." if per_sample == 1 else
                f"up to {1 - per_sample:.0%} did (budget spent)."))
  slower = []
  for c in results["cells"]:
    th = c["sides"].get("torchdeq")
    if th:
      k_j = c["sides"]["jdeq"]["summary"]["batched_evaluations"]
      k_t = th["summary"]["batched_evaluations"]
      if k_t > 1.1 * k_j:
        slower.append(f"{c['solver']} at {c['tol']:g}: {k_t} vs {k_j}")
  if slower:
    text += (" Where TorchDEQ's loop ran longer (" + "; ".join(slower) + "), its own "
             "samples also first met the tolerance later (dashed curves in "
             "tolerance_nfe.png): the solvers converge differently, which stopping "
             "rules do not change.")
  return text


def markdown_table(results: dict[str, Any]) -> str:
  """The table of every cell × side, the findings and how to read them."""
  conditions = results.get("conditions", {})
  workload = results["workload"]
  skipped = "; ".join(f"{SIDE_TITLES[k]} not run: {v}"
                      for k, v in results.get("skipped", {}).items() if v)
  lines = [
      f"Time to tolerance, forward solve only, relative tolerance, budget "
      f"{workload['budget']} evaluations. Workload: {workload['title']}, batch "
      f"{workload['batch']}, d = {workload['dim']}. Device: {results['device']}; "
      f"PyTorch side: {results.get('torch_device', 'not run')}. Threads per side: "
      f"{conditions.get('threads', '?')}; 1-min load average at start "
      f"{results['load']['load1']:.2f} on {results['load']['cores']} cores; "
      f"{results['reps']} solves × {results['rounds']} alternating rounds per side."
      + (f" {skipped}." if skipped else ""),
      "",
      "| solver | tol | side | ms, median (p25–p75) | batched evals | ms / batched eval "
      "| NFE per sample, median (min–max) | needed share | rel. residual median / max "
      "| converged |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for cell in results["cells"]:
    for key in SIDES:
      side = cell["sides"].get(key)
      if not side:
        continue
      s = side["summary"]
      per_eval, needed = s["ms_per_batched_evaluation"], s["needed_share"]
      lines.append(
          f"| {cell['solver']} | {cell['tol']:g} | {SIDE_TITLES[key]} "
          f"| {_ms(side.get('timing'))} | {s['batched_evaluations']} "
          f"| {'–' if per_eval is None else f'{per_eval:.3g}'} "
          f"| {s['nfe_median']:g} ({s['nfe_min']}–{s['nfe_max']}) "
          f"| {'–' if needed is None else f'{needed:.2f}'} "
          f"| {s['residual_median']:.1e} / {s['residual_max']:.1e} "
          f"| {s['converged_share']:.0%} |")
  lines += ["", "Findings:", ""] + [f"- {findings(c)}" for c in results["cells"]]
  summary = overview(results)
  if summary:
    lines += ["", summary]
  lines += [
      "",
      "NFE per sample: jdeq's `stats.nstep` (each sample stops when its own residual "
      "meets the tolerance); on the batch-wide sides every sample gets the batch's "
      "count (TorchDEQ's `info['nstep']` is per sample but is the step of its lowest "
      "residual, not the evaluations spent). Batched evals: evaluations of the map on "
      "the whole batch (the loop length; a batched loop keeps evaluating stopped "
      "samples, so wall time follows this number). Needed share: Σᵢ hᵢ / (B·K), hᵢ "
      "the evaluation at which sample i first met the tolerance. \"jdeq, all to K\": "
      "no stopping, budget K = jdeq's loop length (batch-wide stopping at the same "
      "step). Residuals: ‖f(z) − z‖ / ‖f(z)‖ recomputed in float64 at the returned "
      "states; converged: at most the tolerance (1% slack for the float32 rounding "
      "of the solvers' own residuals). "
      "TorchDEQ's Broyden and the reference Broyden may spend budget + 1 "
      "evaluations (one at z0); the reference stops on the residual of the whole "
      "batch at once.",
  ]
  return "\n".join(lines)


def write_readme(table: str, readme_path: str) -> bool:
  """Replaces the README's tolerance block; False (nothing written) without markers."""
  return report.replace_between_markers(readme_path, table, README_START, README_END)


def plot_nfe(results: dict[str, Any], path: str) -> str:
  """ECDFs of the per-sample NFE: one panel per tolerance (row) × solver (column)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import

  solvers = [s for s in SOLVERS if any(c["solver"] == s for c in results["cells"])]
  tols = sorted({c["tol"] for c in results["cells"]}, reverse=True)
  fig, axes = plt.subplots(len(tols), len(solvers), squeeze=False,
                           figsize=(4.6 * len(solvers), 3.6 * len(tols)))
  colors = {"jdeq": "tab:blue", "jdeq_all_k": "tab:cyan", "torchdeq": "tab:orange",
            "reference": "tab:green"}
  for cell in results["cells"]:
    ax = axes[tols.index(cell["tol"])][solvers.index(cell["solver"])]
    for key, side in cell["sides"].items():
      if key == "jdeq_all_k":
        continue  # its NFE is jdeq's loop length, the end of jdeq's curve
      nfe = np.sort(np.asarray(side["nfe"]))
      share = np.arange(1, nfe.size + 1) / nfe.size
      label = f"{SIDE_TITLES[key]} NFE" + (" (batch count)" if key != "jdeq" else "")
      ax.step(nfe, share, where="post", color=colors[key], label=label)
      hits = side.get("hit_nfe")
      if key != "jdeq" and hits and all(h is not None for h in hits):
        ax.step(np.sort(hits), share, where="post", color=colors[key], ls="--",
                lw=1.0, label=f"{SIDE_TITLES[key]}: first met tol")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("map evaluations per sample")
    ax.set_ylabel("share of samples")
    ax.set_title(f"{cell['solver']}, rel. tol {cell['tol']:g}")
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------- driver

def parse_args(argv):
  parser = argparse.ArgumentParser(description="time to tolerance: jdeq vs TorchDEQ")
  parser.add_argument("--solvers", default=",".join(SOLVERS),
                      help="comma-separated: fixed_point_iteration, anderson, broyden")
  parser.add_argument("--tols", default=",".join(f"{t:g}" for t in TOLERANCES),
                      help="comma-separated relative tolerances")
  parser.add_argument("--budget", type=int, default=BUDGET,
                      help="most map evaluations per solve")
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--dim", type=int, default=DIM)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reps", type=int, default=10, help="timed solves per round")
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed solves per side")
  parser.add_argument("--threads", type=int, default=1,
                      help="cores, and so threads, for each side (0: all)")
  parser.add_argument("--xla-flags", default="", help="appended to $XLA_FLAGS")
  parser.add_argument("--torch-python", default=run.default_torch_python())
  parser.add_argument("--no-torch", action="store_true", help="run the jdeq side only")
  parser.add_argument("--reference-dir", default=None,
                      help="a checkout of the DEQ authors' repository (locuslab/deq): "
                           "adds their Broyden as a third side")
  parser.add_argument("--reference-python", default=None,
                      help="interpreter for the reference side (default: the TorchDEQ "
                           "one; it needs torch, numpy, scipy and termcolor)")
  parser.add_argument("--out", default=run.DEFAULT_OUT)
  parser.add_argument("--readme", default=os.path.join(run.REPO_ROOT, "README.md"),
                      help="README to write the table into, between its markers "
                           "('' to skip)")
  args = parser.parse_args(argv)
  args.solvers = [s for s in args.solvers.split(",") if s]
  for name in args.solvers:
    if name not in SOLVERS:
      parser.error(f"unknown solver {name!r}; valid solvers are {list(SOLVERS)}")
  args.tols = [float(t) for t in args.tols.split(",") if t]
  return args


def _start_workers(args, conditions
                   ) -> tuple[dict[str, run.TorchWorker], dict[str, str | None]]:
  """The PyTorch workers that can run, and why the others are skipped."""
  workers, skipped = {}, {"torchdeq": None, "reference": None}
  if args.no_torch:
    skipped["torchdeq"] = "--no-torch"
  else:
    problem = run.torch_side_problem(args.torch_python)
    if problem:
      skipped["torchdeq"] = problem
    else:
      workers["torchdeq"] = start_worker(args.torch_python, "torchdeq",
                                         conditions["threads"])
  if not args.reference_dir:
    skipped["reference"] = ("no --reference-dir given (a checkout of the DEQ authors' "
                            "repository, locuslab/deq)")
  elif "broyden" not in args.solvers:
    skipped["reference"] = "it runs Broyden only, which is not among --solvers"
  else:
    python = args.reference_python or args.torch_python
    try:
      root = reference_root(args.reference_dir)
    except ValueError as error:
      skipped["reference"] = str(error)
    else:
      if not os.path.exists(python):
        skipped["reference"] = f"no interpreter at {python!r}"
      else:
        workers["reference"] = start_worker(python, "reference", conditions["threads"], root)
  return workers, skipped


def measure_cell(arrays, solver_name: str, tol: float, args,
                 workers: dict[str, run.TorchWorker],
                 all_k_solves: dict, skipped: dict[str, str | None]) -> dict:
  """Every side of one solver × tolerance, set up, then timed in alternating rounds."""
  compiled, jd_args, compile_s = compile_solve(arrays, jdeq_solver(solver_name, tol,
                                                                   args.budget))
  z, stats = jax.block_until_ready(compiled(*jd_args))
  sides = {"jdeq": dict(jdeq_figures(arrays, z, stats, tol, per_sample=True),
                        compile_s=compile_s)}
  calls = {"jdeq": lambda: jax.block_until_ready(compiled(*jd_args))}

  # Batch-wide stopping at jdeq's own loop length: one compilation per solver with a
  # traced budget serves every tolerance.
  k = sides["jdeq"]["batched_evaluations"]
  if solver_name not in all_k_solves:
    all_k_solves[solver_name] = compile_solve(
        arrays, jdeq_solver(solver_name, workloads.FULL_BUDGET_TOL, args.budget),
        traced_budget=True)
  all_k, k_args, k_compile_s = all_k_solves[solver_name]
  k_args = k_args[:-1] + (jnp.asarray(k, jnp.int32),)
  z_k, stats_k = jax.block_until_ready(all_k(*k_args))
  sides["jdeq_all_k"] = dict(jdeq_figures(arrays, z_k, stats_k, tol, per_sample=False),
                             compile_s=k_compile_s)
  # Up to its first hit a sample follows the same iterates in both runs (samples
  # are independent, and masking starts only once a sample has stopped).
  sides["jdeq_all_k"]["hit_nfe"] = sides["jdeq"]["hit_nfe"]
  calls["jdeq_all_k"] = lambda: jax.block_until_ready(all_k(*k_args))

  active = {}
  for key, worker in list(workers.items()):
    if key == "reference" and solver_name != "broyden":
      continue
    try:
      worker.request(cmd="setup", solver=solver_name, tol=tol, budget=args.budget,
                     warmup=args.warmup)
    except RuntimeError as error:
      if key != "reference":
        raise
      # The reference is imported at its first setup: a missing dependency of the
      # checkout skips that side, with the worker's message.
      skipped[key] = str(error)
      print(f"reference side skipped: {error}", flush=True)
      workers.pop(key).close()
      continue
    active[key] = worker
  for call in calls.values():
    for _ in range(args.warmup):
      call()
  rounds = {key: [] for key in (*calls, *active)}
  for _ in range(args.rounds):
    for key, call in calls.items():
      rounds[key].append(timing.time_round(call, args.reps))
    for key, worker in active.items():
      rounds[key].append(worker.request(cmd="time", reps=args.reps)["seconds"])
  for key, worker in active.items():
    sides[key] = worker_figures(arrays, worker.request(cmd="stats"))
  for key, side in sides.items():
    side["timing"] = timing.Timing.from_samples(rounds[key]).as_dict()
    side["summary"] = summarize(side, tol)
  return {"solver": solver_name, "tol": tol, "sides": sides}


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  started = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  conditions = run.configure_processes(args.threads, args.xla_flags)
  load = timing.machine_load()
  warning = timing.idle_warning()
  device = f"{jax.devices()[0].platform} (jax {jax.__version__})"
  print(f"device: {device}; {conditions['threads']} threads per side", flush=True)
  if warning:
    print(warning, flush=True)

  arrays = tolerance_arrays(args.batch, args.dim, args.seed)
  workers, skipped = _start_workers(args, conditions)
  for key, reason in skipped.items():
    if reason:
      print(f"{SIDE_TITLES[key]} side skipped: {reason}", flush=True)
  results: dict[str, Any] = {
      "device": device, "load": load, "warning": warning, "conditions": conditions,
      "reps": args.reps, "rounds": args.rounds, "skipped": skipped,
      "workload": {"title": WORKLOAD_TITLE, "batch": args.batch, "dim": args.dim,
                   "budget": args.budget, "seed": args.seed,
                   "scale": np.asarray(arrays["scale"]).tolist()},
      "cells": []}
  try:
    with tempfile.TemporaryDirectory() as scratch:
      # The PyTorch sides read the very arrays drawn here.
      path = os.path.join(scratch, "arrays.npz")
      np.savez(path, **arrays)
      for key, worker in list(workers.items()):
        try:
          worker.request(cmd="load", arrays=path)
          results[f"{key}_device"] = worker.request(cmd="info")["device"]
        except RuntimeError as error:
          skipped[key] = str(error)
          print(f"{SIDE_TITLES[key]} side skipped: {error}", flush=True)
          worker.close()
          del workers[key]
      if "torchdeq" in workers:
        results["torch_device"] = results["torchdeq_device"]
      all_k_solves: dict = {}
      for solver_name in args.solvers:
        for tol in args.tols:
          cell = measure_cell(arrays, solver_name, tol, args, workers, all_k_solves,
                              skipped)
          results["cells"].append(cell)
          line = f"{solver_name:<22} tol {tol:<6g}"
          for key, side in cell["sides"].items():
            line += (f" | {SIDE_TITLES[key]} {side['timing']['median'] * 1e3:7.2f} ms, "
                     f"{side['summary']['batched_evaluations']} evals")
          print(line + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
  finally:
    for worker in workers.values():
      worker.close()

  results["end_load"] = timing.machine_load()
  results["wall_s"] = time.perf_counter() - started
  table = markdown_table(results)
  print(table)
  with open(os.path.join(args.out, "tolerance.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "tolerance.json"), "w") as f:
    json.dump(results, f, indent=2)
  chart = plot_nfe(results, os.path.join(args.out, "tolerance_nfe.png"))
  in_readme = write_readme(table, args.readme)
  print(f"written: {os.path.join(args.out, 'tolerance.md')}, tolerance.json, {chart}"
        + (f"; table also in {args.readme}" if in_readme else
           f"; README not changed (no {README_START} / {README_END} markers)")
        + f"; total {results['wall_s']:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

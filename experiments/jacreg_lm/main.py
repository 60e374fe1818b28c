"""DEQ-Transformers on WikiText-2 with and without Jacobian regularization, equal
CPU budgets (the JR paper's Table 1 in miniature).

    python -m experiments.jacreg_lm.main --data-dir TFDS_DIR \\
        --manual-dir path/to/wikitext-2 [--minutes 18.5] [--arms postln,postln_jr]

Each arm (``experiments.jacreg_lm.config``) trains ``deq_transformer_wt2_small`` for
the same wall-clock budget in its own process (``python -m experiments.train``,
so its peak resident memory is its own), its schedule sized to the steps it makes
in that time. Then, from its checkpoint, on the first ``--sweep-batches``
validation segments and as many training segments (evaluation mode, memory
carried): perplexity with the forward solver hard-stopped after ``k``
evaluations, the evaluations each sequence needs to reach relative residual
1e-3, and the mean residual after each evaluation. Writes ``results.json``,
``results.csv`` and ``jacreg_lm.png`` to ``--out``; a finished arm is not run
again.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import matplotlib
import numpy as np
from flax import nnx

import jdeq
from experiments import configs
from experiments.jacreg_lm import config as study
from jdeq import data, models, ops
from jdeq.experiment import apply_overrides, finished_report, model_config
from jdeq.train import LanguageModeling, budget_sweep, make_optimizer, restore_state
from jdeq.train.reporting import read_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

ops.tune_cpu_runtime()  # must precede JAX's first computation

TRACE_SOLVER = jdeq.Anderson(max_iter=40, tol=1e-8, stop_mode="rel", m=6, ridge=1e-4,
                             record_trace=True)
BUDGETS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 25, 30, 40)
TOLERANCE = 1e-3
FIXED_BUDGET = 12  # the regularized post-LN model's threshold


def arm_experiment(name: str, minutes: float, seed: int, manual_dir: str):
  """The base experiment with ``name``'s settings, and the overrides that make it."""
  arm = study.ARMS[name]
  steps = max(10, round(arm.steps_per_minute * minutes))
  overrides = study.overrides(arm, steps, minutes, seed)
  if manual_dir:
    overrides.append(f"data.manual_dir={manual_dir}")
  return apply_overrides(configs.get(study.BASE_EXPERIMENT), overrides), overrides


def train_arm(name: str, overrides: list[str], workdir: str,
              data_dir: str | None) -> float:
  """Runs one arm in a child process; returns its peak resident memory in MiB."""
  command = [sys.executable, "-m", "experiments.train", "--config",
             study.BASE_EXPERIMENT, "--workdir", workdir, "--no-progress", *overrides]
  if data_dir:
    command += ["--data-dir", data_dir]
  print(f"\n== arm {name}: {' '.join(command[1:])}", flush=True)
  child = subprocess.Popen(command)
  _, status, usage = os.wait4(child.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"arm {name} failed (exit status "
                       f"{os.waitstatus_to_exitcode(status)}); its log is above")
  return usage.ru_maxrss / 1024  # KiB on Linux


def sweep_arm(experiment, workdir: str, data_dir: str | None, batches: int) -> dict:
  """Budget sweeps of the trained arm on validation and training segments."""
  traced = dataclasses.replace(experiment, model_overrides={
      **experiment.model_overrides, "eval_solver": TRACE_SOLVER})
  text = dataclasses.replace(experiment.data, data_dir=data_dir)
  info = data.text_info(text)
  task = LanguageModeling()
  model = models.create(model_config(traced), rngs=nnx.Rngs(0))
  first = next(iter(data.lm_train_batches(text, start_step=0)))
  state = restore_state(model, os.path.join(workdir, "checkpoints"),
                        make_optimizer(experiment.train, info.steps_per_epoch),
                        carry=task.init_carry(model, first))
  result = {}
  for split in ("validation", "train"):
    segments = data.lm_eval_batches(text, split=split)
    chosen = [segment for _, segment in zip(range(batches), segments)]
    result[split] = budget_sweep(state, chosen, budgets=BUDGETS,
                                 tolerances=(TOLERANCE,), task=task)
  return result


def summarize(name: str, report: dict, sweeps: dict, peak_mib: float,
              workdir: str) -> dict:
  """The arm's row of the table, with its curves."""
  records = read_records(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train"]
  equilibrium = [r for r in train if r.get("mode") == "equilibrium"]
  valid, training = sweeps["validation"], sweeps["train"]
  to_tol = lambda sweep: sweep["iterations_to_tolerance"][TOLERANCE]
  return dict(
      valid_perplexity=report["test_perplexity"], valid_fwd_nfe=report["test_fwd_nfe"],
      valid_residual=report["test_residual"], steps=report["step"],
      stopped=report["stopped"], train_tokens_per_s=report["train_tokens_per_s"],
      wall_time_s=report["wall_time_s"], peak_rss_mib=peak_mib,
      train_fwd_nfe=(float(np.mean([r["fwd_nfe"] for r in equilibrium[-4:]]))
                     if equilibrium else None),
      train_perplexity=train[-1]["perplexity"] if train else None,
      valid_nfe_to_tol=to_tol(valid), train_nfe_to_tol=to_tol(training),
      valid_residual_at_budget=valid["mean_trace"][FIXED_BUDGET - 1],
      train_residual_at_budget=training["mean_trace"][FIXED_BUDGET - 1],
      valid_perplexity_at_budget=valid["perplexity"],
      valid_mean_trace=valid["mean_trace"], train_mean_trace=training["mean_trace"],
      curve=dict(step=[r["step"] for r in train],
                 perplexity=[r["perplexity"] for r in train],
                 fwd_nfe=[r["fwd_nfe"] for r in train],
                 residual=[r["residual"] for r in train],
                 tokens_per_s=[r["tokens_per_s"] for r in train]),
      paper=study.PAPER[name])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR)")
  parser.add_argument("--manual-dir", default=None,
                      help="directory of wiki.{train,valid,test}.tokens, to prepare "
                           "the TFDS dataset the first time")
  parser.add_argument("--out", default="results/jacreg_lm")
  parser.add_argument("--minutes", type=float, default=18.5,
                      help="wall-clock training budget of each arm")
  parser.add_argument("--arms", default=",".join(study.ARMS),
                      help=f"comma-separated subset of {list(study.ARMS)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep-batches", type=int, default=16,
                      help="segments (of eval_batch_size x eval_tgt_len tokens) per "
                           "split in the budget sweeps")
  args = parser.parse_args(argv)
  names = [name.strip() for name in args.arms.split(",") if name.strip()]
  unknown = sorted(set(names) - set(study.ARMS))
  if unknown:
    parser.error(f"unknown arms {unknown}; known: {list(study.ARMS)}")
  os.makedirs(args.out, exist_ok=True)

  results = dict(settings=vars(args), arms={})
  for name in names:
    experiment, overrides = arm_experiment(name, args.minutes, args.seed,
                                           args.manual_dir)
    workdir = os.path.join(args.out, name)
    memory_path = os.path.join(workdir, "peak_rss.json")
    if os.path.exists(os.path.join(workdir, "report.json")):
      report = finished_report(workdir, experiment)  # finished: not run again
      with open(memory_path) as handle:
        peak_mib = json.load(handle)["peak_rss_mib"]
    else:
      peak_mib = train_arm(name, overrides, workdir, args.data_dir)
      with open(memory_path, "w") as handle:
        json.dump({"peak_rss_mib": peak_mib}, handle)
      report = finished_report(workdir, experiment)
    start = time.monotonic()
    sweeps = sweep_arm(experiment, workdir, args.data_dir, args.sweep_batches)
    print(f"arm {name}: budget sweeps in {time.monotonic() - start:.0f} s", flush=True)
    results["arms"][name] = summarize(name, report, sweeps, peak_mib, workdir)

  with open(os.path.join(args.out, "results.json"), "w") as handle:
    json.dump(results, handle, indent=2)
  _write_csv(results, os.path.join(args.out, "results.csv"))
  _plot(results, os.path.join(args.out, "jacreg_lm.png"))
  _print_table(results, args)
  return 0


_COLUMNS = ("steps", "stopped", "valid_perplexity", "valid_fwd_nfe", "train_fwd_nfe",
            "valid_nfe_to_tol", "train_nfe_to_tol", "valid_residual_at_budget",
            "train_residual_at_budget", "train_tokens_per_s", "peak_rss_mib")


def _flat(value):
  return value["mean"] if isinstance(value, dict) else value


def _write_csv(results, path):
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(("arm", *_COLUMNS, f"valid_perplexity_at_{FIXED_BUDGET}"))
    for name, row in results["arms"].items():
      writer.writerow((name, *(_flat(row[c]) for c in _COLUMNS),
                       row["valid_perplexity_at_budget"][FIXED_BUDGET]))


def _print_table(results, args):
  print(f"\nseed {args.seed}, {args.minutes} min of training per arm; sweeps on "
        f"{args.sweep_batches} segments per split; NFE to rel. residual "
        f"{TOLERANCE:g} (share of sequences that reach it)")
  print(f"arm        steps  valid ppl  ppl@{FIXED_BUDGET}  NFE tr/val  "
        f"to-tol tr / val       res@{FIXED_BUDGET} tr / val    tok/s  peak MiB  "
        f"paper (WT103)")
  fmt = lambda t: (f"{t['mean']:.1f}" if t["mean"] is not None else "-") + \
      f" ({t['reached']:.2f})"
  for name, r in results["arms"].items():
    paper = r["paper"]
    cite = (f"{paper['perplexity']} ppl / {paper['nfe']} NFE"
            if paper["perplexity"] else paper["note"])
    print(f"{name:<10} {r['steps']:>5}  {r['valid_perplexity']:9.1f}  "
          f"{r['valid_perplexity_at_budget'][FIXED_BUDGET]:7.1f}  "
          f"{r['train_fwd_nfe'] or 0:4.1f}/{r['valid_fwd_nfe']:4.1f}  "
          f"{fmt(r['train_nfe_to_tol'])} / {fmt(r['valid_nfe_to_tol'])}  "
          f"{r['train_residual_at_budget']:.1e} / {r['valid_residual_at_budget']:.1e}  "
          f"{r['train_tokens_per_s']:6.0f}  {r['peak_rss_mib']:8.0f}  {cite}")


def _plot(results, path):
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  (curves, nfe), (budget, trace) = axes
  text = configs.get(study.BASE_EXPERIMENT).data
  tokens_per_step = text.batch_size * text.tgt_len  # every arm reads the same batches
  for name, r in results["arms"].items():
    curve = r["curve"]
    seconds = np.cumsum(np.diff([0] + curve["step"]) *
                        tokens_per_step / np.maximum(curve["tokens_per_s"], 1e-9))
    curves.semilogy(seconds / 60, curve["perplexity"], label=name)
    nfe.plot(curve["step"], curve["fwd_nfe"], label=name)
    ks = sorted(r["valid_perplexity_at_budget"])
    budget.semilogy(ks, [r["valid_perplexity_at_budget"][k] for k in ks], marker="o",
                    label=name)
    trace.semilogy(np.arange(1, len(r["valid_mean_trace"]) + 1),
                   r["valid_mean_trace"], label=name)
  curves.set(xlabel="training time (min)", ylabel="train perplexity",
             title="learning curves at equal wall clock")
  nfe.set(xlabel="step", ylabel="forward NFE", title="training forward NFE")
  budget.set(xlabel="forward budget (evaluations)", ylabel="valid perplexity",
             title="perplexity when hard-stopped")
  trace.axhline(TOLERANCE, color="gray", lw=0.8, ls="--")
  trace.set(xlabel="evaluation", ylabel="mean relative residual",
            title="convergence on validation segments")
  for axis in axes.flat:
    axis.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())

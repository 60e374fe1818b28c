"""Trains MOptEqs, GEQ and MDEQ-Tiny on CIFAR-10 under the same budget, side by side.

  python -m experiments.optcells_compare --data-dir DIR [--out runs/optcells_compare]
      [--minutes 11.5] [--models mopteqs,geq,mdeq_tiny] [--reuse mdeq_tiny=RUN_DIR]

The budget is the same for every model: ``--minutes`` of training wall clock
(compilation included) on this machine, batches of 64 images, then an evaluation on
the first 2,000 CIFAR-10 test images. Each model runs its own recipe with the schedule
compressed into the number of steps it can make in that time (measured step times,
see the configs): MOptEqs and GEQ the papers' SGD step schedule
(``*_cifar10_15min``), MDEQ-Tiny its reference Adam/cosine recipe with the reference
share of unrolled pretraining (``experiments.configs.mdeq_cifar``); the schedules
scale with ``--minutes``. A run stops cleanly at the time cap if the machine is
slower than measured.

Each model trains through the library entry point into ``OUT/<model>/``
(metrics.jsonl, report.json, curves.png; re-running resumes). ``--reuse
LABEL=DIR`` takes a finished run of exactly the same experiment from ``DIR``
instead (e.g. the unregularized arm of ``experiments.jacreg_cifar``, which is this
MDEQ-Tiny run); its recorded configuration is checked against this one. The
comparison is written to ``OUT/comparison.json`` and ``OUT/comparison.png``.
"""

from __future__ import annotations


import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.configs import mdeq_cifar, mopteqs_recognition  # noqa: E402
from jdeq import ops  # noqa: E402
from jdeq.experiment import (ExperimentConfig, apply_overrides,  # noqa: E402
                             finished_report, run_experiment)
from jdeq.train import reporting  # noqa: E402

ops.tune_cpu_runtime()  # must precede JAX's first computation

DEFAULT_MINUTES = mdeq_cifar.COMPARISON_MINUTES
TEST_IMAGES = mdeq_cifar.COMPARISON_TEST_IMAGES


def _optimization_cell(family: str):
  def experiment(minutes: float) -> ExperimentConfig:
    budgeted = mopteqs_recognition.budget_experiment(
        family, steps=round(mopteqs_recognition.BUDGET_STEPS[family] * minutes
                            / mopteqs_recognition.BUDGET_MINUTES), minutes=minutes)
    return apply_overrides(budgeted, ["data.eval_batch_size=100",
                                      f"train.max_eval_batches={TEST_IMAGES // 100}"])
  return experiment


def _mdeq_tiny(minutes: float) -> ExperimentConfig:
  steps = round(mdeq_cifar.COMPARISON_STEPS * minutes / DEFAULT_MINUTES)
  return mdeq_cifar.tiny_budget_experiment(minutes, steps, test_images=TEST_IMAGES)


# model label -> its budgeted experiment for a number of training minutes
EXPERIMENTS = {"mopteqs": _optimization_cell("mopteqs"),
               "geq": _optimization_cell("geq"), "mdeq_tiny": _mdeq_tiny}


def summarize(label: str, workdir: str) -> dict:
  with open(os.path.join(workdir, "report.json")) as handle:
    report = json.load(handle)
  records = reporting.read_records(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r.get("kind") == "train"]
  return {
      "model": report["config"].get("model", {}).get("type", label),
      "num_params": report["num_params"],
      "test_accuracy": report["test_accuracy"],
      "test_fwd_nfe": report["test_fwd_nfe"],
      "test_residual": report["test_residual"],
      "steps": report["step"],
      "stopped": report["stopped"],
      "wall_time_s": report["wall_time_s"],
      "train_images_per_s": report["train_images_per_s"],
      "curve": {key: [r.get(key) for r in train]
                for key in ("step", "loss", "accuracy", "fwd_nfe", "residual")},
  }


def plot(results: dict, path: str) -> None:
  figure, axes = plt.subplots(1, 4, figsize=(18, 4))
  for label, result in results.items():
    curve = result["curve"]
    for axis, key in zip(axes[:3], ("loss", "accuracy", "fwd_nfe")):
      axis.plot(curve["step"], curve[key], label=label)
  for axis, title in zip(axes[:3], ("train loss", "train accuracy", "forward NFE")):
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.legend()
  labels = list(results)
  axes[3].bar(labels, [results[k]["test_accuracy"] for k in labels])
  axes[3].axhline(0.1, color="gray", linestyle="--", label="chance")
  axes[3].set_title("test accuracy")
  axes[3].legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.optcells_compare",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR)")
  parser.add_argument("--out", default=os.path.join("runs", "optcells_compare"))
  parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                      help="training wall-clock budget of every model")
  parser.add_argument("--models", default=",".join(EXPERIMENTS),
                      help=f"comma-separated subset of {list(EXPERIMENTS)}")
  parser.add_argument("--reuse", action="append", default=[], metavar="LABEL=DIR",
                      help="take a finished run of the same experiment from DIR")
  args = parser.parse_args(argv)
  labels = [label.strip() for label in args.models.split(",") if label.strip()]
  reuse = dict(item.split("=", 1) for item in args.reuse if "=" in item)
  unknown = sorted((set(labels) | set(reuse)) - set(EXPERIMENTS))
  if unknown or len(reuse) != len(args.reuse) or args.minutes <= 0:
    parser.error(f"unknown models {unknown} (valid: {list(EXPERIMENTS)})" if unknown
                 else "--reuse takes LABEL=DIR and --minutes must be positive")
  results = {}
  for label in labels:
    experiment = EXPERIMENTS[label](args.minutes)
    train = experiment.train
    if label in reuse:
      workdir = reuse[label]
      try:
        finished_report(workdir, experiment)
      except ValueError as error:
        parser.error(f"--reuse: {error}")
      print(f"== {label}: reusing the finished run in {workdir}", flush=True)
    else:
      workdir = os.path.join(args.out, label)
      print(f"== {label}: {train.total_steps} steps of batch "
            f"{experiment.data.batch_size}, cap {train.max_minutes} min -> {workdir}",
            flush=True)
      run_experiment(experiment, workdir=workdir, data_dir=args.data_dir,
                     name=f"optcells_compare/{label}", progress=False)
    results[label] = summarize(label, workdir)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "comparison.json"), "w") as handle:
    json.dump({"budget": {"train_minutes": args.minutes}, "results": results},
              handle, indent=2)
  plot(results, os.path.join(args.out, "comparison.png"))
  for label, result in results.items():
    print(f"{label:10s} params {result['num_params']:>8,d}  test acc "
          f"{result['test_accuracy']:.4f}  NFE {result['test_fwd_nfe']:.1f}  steps "
          f"{result['steps']}  {result['train_images_per_s']:.1f} img/s  wall "
          f"{result['wall_time_s']:.0f}s")
  return 0

if __name__ == "__main__":
  sys.exit(main())

"""Trains MOptEqs, GEQ and MDEQ-Tiny on CIFAR-10 under the same budget, side by side.

  python -m experiments.optcells_compare --data-dir DIR [--out runs/optcells_compare]
      [--steps 180] [--batch-size 64] [--minutes 11.5] [--models mopteqs,geq,mdeq_tiny]

Budget (the same for every model): ``--steps`` optimizer steps of ``--batch-size``
images (the same number of training images) with each model's own recipe compressed
into those steps, and a wall-clock cap of ``--minutes`` of training per model (the
run stops cleanly at the first step past it); each run then evaluates on the full
CIFAR-10 test split. Recipes: MOptEqs and GEQ use the papers' SGD step schedule
(``*_cifar10_15min``), MDEQ-Tiny its reference Adam/cosine recipe with the reference
share of unrolled pretraining steps (``mdeq_cifar_tiny_20min``); learning rates
stay those of the recipes whatever ``--batch-size`` is. The defaults are the
15-minute budget of ``*_cifar10_15min``: batch 64 and GEQ's 180 steps (the slower
of the two optimization-induced models), which fit in the 11.5-minute training cap
on a 2-core CPU.

Each model trains through ``experiments.train``'s library entry point into
``OUT/<model>/`` (metrics.jsonl, report.json, curves.png; re-running resumes). The
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

from experiments import configs  # noqa: E402
from experiments.configs.mopteqs_recognition import (  # noqa: E402
    BUDGET_BATCH_SIZE, BUDGET_MINUTES, BUDGET_STEPS, CIFAR_TRAIN_IMAGES)
from jdeq.train import reporting, run_experiment  # noqa: E402

# model label -> registered experiment whose recipe it uses
EXPERIMENTS = {"mopteqs": "mopteqs_cifar10_15min", "geq": "geq_cifar10_15min",
               "mdeq_tiny": "mdeq_cifar_tiny_20min"}


def budgeted(label: str, steps: int, minutes: float,
             max_eval_batches: Optional[int], batch_size: int = BUDGET_BATCH_SIZE):
  """The model's experiment with its schedule rescaled to ``steps`` of ``batch_size``."""
  experiment = configs.get(EXPERIMENTS[label])
  train = experiment.train
  scale = steps / train.num_steps(1)  # these recipes are all given in total_steps
  # Decay points are given in epochs of the recipe's batch size; an epoch of
  # ``batch_size`` has a different number of steps, and the decays must keep their
  # positions in steps.
  epoch_ratio = (CIFAR_TRAIN_IMAGES // experiment.data.batch_size) / (
      CIFAR_TRAIN_IMAGES // batch_size)
  train = dataclasses.replace(
      train, total_steps=steps, max_minutes=minutes,
      pretrain_steps=round(train.pretrain_steps * scale),
      decay_epochs=tuple(epoch * scale * epoch_ratio
                         for epoch in train.decay_epochs),
      checkpoint_every=max(1, min(train.checkpoint_every or steps, steps)),
      log_every=max(1, min(train.log_every, steps)),
      max_eval_batches=max_eval_batches)
  data = dataclasses.replace(experiment.data, batch_size=batch_size)
  return dataclasses.replace(experiment, train=train, data=data)


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
  parser.add_argument("--steps", type=int, default=min(BUDGET_STEPS.values()),
                      help="optimizer steps per model")
  parser.add_argument("--batch-size", type=int, default=BUDGET_BATCH_SIZE,
                      help="training batch size of every model")
  parser.add_argument("--minutes", type=float, default=BUDGET_MINUTES,
                      help="training wall-clock cap per model")
  parser.add_argument("--models", default=",".join(EXPERIMENTS),
                      help=f"comma-separated subset of {list(EXPERIMENTS)}")
  parser.add_argument("--max-eval-batches", type=int, default=None,
                      help="evaluate on at most this many test batches (smoke runs)")
  args = parser.parse_args(argv)
  labels = [label.strip() for label in args.models.split(",") if label.strip()]
  unknown = sorted(set(labels) - set(EXPERIMENTS))
  if unknown or args.steps < 1 or args.batch_size < 1 or args.minutes <= 0:
    parser.error(f"unknown models {unknown} (valid: {list(EXPERIMENTS)})" if unknown
                 else "--steps, --batch-size and --minutes must be positive")
  results = {}
  for label in labels:
    workdir = os.path.join(args.out, label)
    print(f"== {label}: {EXPERIMENTS[label]} for {args.steps} steps of batch "
          f"{args.batch_size} (cap {args.minutes} min) -> {workdir}", flush=True)
    run_experiment(budgeted(label, args.steps, args.minutes, args.max_eval_batches,
                            args.batch_size),
                   workdir=workdir, data_dir=args.data_dir, name=EXPERIMENTS[label],
                   progress=False)
    results[label] = summarize(label, workdir)
  budget = {"steps": args.steps, "batch_size": args.batch_size,
            "train_minutes_cap": args.minutes,
            "max_eval_batches": args.max_eval_batches}
  with open(os.path.join(args.out, "comparison.json"), "w") as handle:
    json.dump({"budget": budget, "results": results}, handle, indent=2)
  plot(results, os.path.join(args.out, "comparison.png"))
  for label, result in results.items():
    print(f"{label:10s} params {result['num_params']:>8,d}  test acc "
          f"{result['test_accuracy']:.4f}  NFE {result['test_fwd_nfe']:.1f}  steps "
          f"{result['steps']}  wall {result['wall_time_s']:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

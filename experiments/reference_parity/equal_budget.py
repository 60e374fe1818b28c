"""MDEQ-Tiny on CIFAR-10 in the same wall-clock budget: jdeq's recipe and the authors'.

    python -m experiments.reference_parity.equal_budget --reference-dir path/to/deq \\
        --torch-python path/to/python-with-torch --data-dir TFDS_DIR --out DIR \\
        [--minutes 20] [--test-images 2000] [--sides jdeq,reference]

Both sides train MDEQ-Tiny for ``--minutes`` of wall clock on this machine, one
after the other, at batch 16 on the real CIFAR-10 training split without
augmentation, and are then tested on the same first ``--test-images`` test
images:

* jdeq: ``python -m experiments.train --config mdeq_cifar_tiny_20min`` (the TINY
  recipe — Adam 1e-3, cosine, dropout 0.25, Broyden 18/20, 10-layer unrolled
  pretraining on the reference's share 3000/19500 of the steps — with its schedule
  sized to the budget from measured step times); the budget is its
  ``train.max_minutes``;
* the reference: locuslab/deq's own ``cls_function.train`` and ``validate`` with its
  TINY yaml (the same recipe, plus its weight decay 2.5e-6 and its normalization),
  its schedule sized by the same rule from step times it measures first
  (``torch_side.py train --calibrate``).

Written to ``DIR/equal_budget.json``; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

from experiments.reference_parity.main import MISSING, TORCH_SIDE

EXPERIMENT = "mdeq_cifar_tiny_20min"
EVAL_BATCH = 100  # the experiment's evaluation batch


def cifar_arrays(data_dir: Optional[str], test_images: int) -> dict[str, np.ndarray]:
  """CIFAR-10 as uint8 NHWC arrays, through ``tfds.load``."""
  import tensorflow_datasets as tfds
  arrays = {}
  for split, name in (("train", "train"), (f"test[:{test_images}]", "test")):
    images, labels = tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=data_dir,
                                             batch_size=-1, as_supervised=True))
    arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels
  return arrays


def run_jdeq(args) -> dict:
  workdir = os.path.join(args.out, "jdeq")
  command = [sys.executable, "-m", "experiments.train", "--config", EXPERIMENT,
             "--workdir", workdir, "--no-progress",
             f"train.max_minutes={args.minutes}",
             f"train.max_eval_batches={args.test_images // EVAL_BATCH}"]
  if args.data_dir:
    command += ["--data-dir", args.data_dir]
  subprocess.run(command, check=True)
  with open(os.path.join(workdir, "report.json")) as handle:
    report = json.load(handle)
  batch = report["config"]["data"]["batch_size"]
  last = report["last_train"]
  return dict(steps=report["step"], planned_steps=report["total_steps"],
              batch_size=batch, images_seen=report["step"] * batch,
              images_per_s=report["train_images_per_s"],
              test_images=report["final_test"]["samples"],
              test_accuracy=report["test_accuracy"],
              test_forward_residual=report["test_residual"],
              last_train_loss=last.get("loss"),
              last_forward_residual=last.get("residual"),
              stopped=report["stopped"], wall_time_s=report["wall_time_s"])


def run_reference(args) -> dict:
  data_path = os.path.join(args.out, "cifar10_arrays.npz")
  np.savez(data_path, **cifar_arrays(args.data_dir, args.test_images))
  out = os.path.join(args.out, "reference.json")
  command = [args.torch_python, TORCH_SIDE, "train", "--reference-dir",
             args.reference_dir, "--data", data_path, "--out", out,
             "--minutes", str(args.minutes), "--batch-size", "16"]
  try:
    subprocess.run(command, check=True)
  finally:
    os.remove(data_path)
  with open(out) as handle:
    return json.load(handle)


def table(results: dict) -> str:
  lines = ["| side | steps (planned) | images seen | images/s | test accuracy | "
           "last train forward residual |", "|---|---|---|---|---|---|"]
  for side, r in results.items():
    lines.append(f"| {side} | {r['steps']} ({r['planned_steps']}) | {r['images_seen']} | "
                 f"{r['images_per_s']:.1f} | {100 * r['test_accuracy']:.2f}% "
                 f"({r['test_images']} images) | {r.get('last_forward_residual')} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference-dir", default=None)
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR"))
  parser.add_argument("--out", default="runs/reference_equal_budget")
  parser.add_argument("--minutes", type=float, default=20.0)
  parser.add_argument("--test-images", type=int, default=2000)
  parser.add_argument("--sides", default="jdeq,reference")
  args = parser.parse_args(argv)
  sides = [side for side in args.sides.split(",") if side]
  unknown = sorted(set(sides) - {"jdeq", "reference"})
  if unknown:
    parser.error(f"unknown --sides {unknown}; valid: jdeq, reference")
  if "reference" in sides and not (args.reference_dir and args.torch_python):
    print(f"error: {MISSING}", file=sys.stderr)
    return 2
  if args.test_images % EVAL_BATCH:
    parser.error(f"--test-images must be a multiple of {EVAL_BATCH}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "equal_budget.json")
  results = {}
  if os.path.exists(path):
    with open(path) as handle:
      results = json.load(handle)["results"]
  for side in sides:
    results[side] = (run_jdeq if side == "jdeq" else run_reference)(args)
    with open(path, "w") as handle:
      json.dump(dict(settings=dict(minutes=args.minutes, test_images=args.test_images),
                     results=results), handle, indent=1)
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

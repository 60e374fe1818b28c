"""Train a registered experiment.

  python -m experiments.train --config mnist_convdeq
  python -m experiments.train --config mdeq_cifar_tiny train.lr=5e-4 data.batch_size=64
  python -m experiments.train --list

Outputs go to ``--workdir`` (default ``runs/<config>``): ``metrics.jsonl``,
``checkpoints/``, ``report.json``, ``curves.png``, ``solver.png`` and TensorBoard
event files (``tensorboard --logdir runs``). Running the
same command again resumes from the latest checkpoint there. The data location is
``--data-dir`` or, if absent, the ``TFDS_DATA_DIR`` environment variable.
"""

from __future__ import annotations


import argparse
import os
import sys
from typing import Optional, Sequence

from experiments import configs
from jdeq import ops
from jdeq.experiment import apply_overrides, run_experiment
from jdeq.train import CheckpointError

ops.tune_cpu_runtime()  # must precede JAX's first computation


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.train",
      description="Train a jdeq experiment configuration.")
  parser.add_argument("--config", help="experiment name (see --list)")
  parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                      help="overrides, e.g. train.lr=0.01 data.batch_size=64 "
                           "model.dropout=0.1")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR)")
  parser.add_argument("--workdir", default=None,
                      help="output directory (default: runs/<config>)")
  parser.add_argument("--list", action="store_true",
                      help="list the experiment configurations and exit")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar (log lines only)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  if args.list:
    for name, summary in configs.describe().items():
      print(f"{name:28s} {summary}")
    return 0
  if not args.config:
    print("error: --config NAME is required (see --list)", file=sys.stderr)
    return 2
  try:
    experiment = apply_overrides(configs.get(args.config), args.overrides)
    workdir = args.workdir or os.path.join("runs", args.config)
    print(f"experiment {args.config}: model {experiment.model}, data "
          f"{experiment.data.name}, workdir {workdir}", flush=True)
    run_experiment(experiment, workdir=workdir, data_dir=args.data_dir,
                   name=args.config, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, CheckpointError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Train a registered experiment.

  python -m experiments.train --config mnist_convdeq
  python -m experiments.train --config mdeq_cifar_tiny train.lr=5e-4 data.batch_size=64
  python -m experiments.train --list
  python -m experiments.train --config mnist_convdeq --distributed   # under srun/mpirun
  python -m experiments.train --config mnist_convdeq --distributed \
      --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

Outputs go to ``--workdir`` (default ``runs/<config>``): ``metrics.jsonl``,
``checkpoints/``, ``report.json``, ``curves.png``, ``solver.png`` and TensorBoard
event files (``tensorboard --logdir runs``). Running the
same command again resumes from the latest checkpoint there. The data location is
``--data-dir`` or, if absent, the ``TFDS_DATA_DIR`` environment variable: a TFDS
data directory, or an array cache (``python -m jdeq.data.export``) for MNIST and
CIFAR without TensorFlow.

``--distributed`` makes this process one of a multi-process job
(:mod:`jdeq.train.distributed`): every process runs the same command with the
same ``--workdir`` (on a file system they all see), the data mesh spans the
devices of all of them, ``data.batch_size`` is the global batch, and process 0
alone writes the logs and the report and prints.
"""

from __future__ import annotations


import argparse
import os
import sys
from typing import Optional, Sequence

from experiments import configs
from jdeq import ops
from jdeq.experiment import apply_overrides, run_experiment
from jdeq.train import CheckpointError, distributed

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
                      help="TFDS data directory, or an array cache written by "
                           "python -m jdeq.data.export (read without TensorFlow; "
                           "default: $TFDS_DATA_DIR)")
  parser.add_argument("--workdir", default=None,
                      help="output directory (default: runs/<config>)")
  parser.add_argument("--list", action="store_true",
                      help="list the experiment configurations and exit")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar (log lines only)")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-process job; the three options below, "
                           "where absent, come from the cluster environment "
                           "(SLURM, Open MPI)")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="address of process 0's coordination service")
  parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                      help="number of processes in the job")
  parser.add_argument("--process-id", type=int, default=None, metavar="I",
                      help="this process's index, 0 <= I < N")
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
  cluster = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
  given = [flag for flag, value in cluster.items() if value is not None]
  if given and not args.distributed:
    verb = "needs" if len(given) == 1 else "need"
    print(f"error: {', '.join(given)} {verb} --distributed", file=sys.stderr)
    return 2
  if args.distributed:  # before anything touches JAX's devices
    try:
      distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
  try:
    experiment = apply_overrides(configs.get(args.config), args.overrides)
    workdir = args.workdir or os.path.join("runs", args.config)
    if distributed.is_primary():
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

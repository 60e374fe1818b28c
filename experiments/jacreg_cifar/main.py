"""MDEQ-Tiny on CIFAR-10 with and without Jacobian regularization, equal CPU budget.

    python -m experiments.jacreg_cifar.main --data-dir DIR [--minutes 8] [--steps N]

Both arms use the ``mdeq_cifar_tiny`` experiment (the reference recipe) with the
schedule scaled to ``--steps`` and a wall-clock stop at ``--minutes``; the
regularized arm adds ``γ · ‖J‖²_F / d`` on steps drawn with probability ``p``. Then,
as in the paper's Tables 2–3 in miniature, it measures test accuracy with the
forward solver hard-stopped after 1…8 evaluations and the evaluations each model
needs to reach relative residuals 1e-2 and 1e-3 (on the first ``--sweep-images``
test images), and writes ``results.json`` and ``jacreg_cifar.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import matplotlib
import numpy as np
from flax import nnx

import jdeq
from experiments import configs
from jdeq import data, models
from jdeq.train import (apply_overrides, budget_sweep, make_optimizer, model_config,
                        restore_state, run_experiment)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

PRETRAIN_FRACTION = 3000 / 19500  # the reference recipe's unrolled share
TRACE_SOLVER = jdeq.Broyden(max_iter=30, tol=1e-6, stop_mode="rel", record_trace=True)


def arm_experiment(name: str, steps: int, minutes: float, gamma: float, prob: float,
                   seed: int):
  overrides = ["train.epochs=None", f"train.total_steps={steps}",
               f"train.pretrain_steps={round(PRETRAIN_FRACTION * steps)}",
               f"train.max_minutes={minutes}", f"train.seed={seed}",
               "train.log_every=10", "train.eval_every=0"]
  if name == "jacobian":
    overrides += [f"train.jac_gamma={gamma}", f"train.jac_prob={prob}"]
  return apply_overrides(configs.get("mdeq_cifar_tiny"), overrides)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default="results/jacreg_cifar")
  parser.add_argument("--minutes", type=float, default=8.0,
                      help="wall-clock training budget of each arm")
  parser.add_argument("--steps", type=int, default=120,
                      help="schedule length; set it so a run ends near --minutes")
  parser.add_argument("--gamma", type=float, default=1.0)
  parser.add_argument("--prob", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep-images", type=int, default=1000)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  results = dict(settings=vars(args), arms={})
  for arm in ("baseline", "jacobian"):
    experiment = arm_experiment(arm, args.steps, args.minutes, args.gamma, args.prob,
                                args.seed)
    workdir = os.path.join(args.out, arm)
    report = run_experiment(experiment, workdir=workdir, data_dir=args.data_dir,
                            name=f"jacreg_cifar/{arm}")
    traced = dataclasses.replace(experiment, model_overrides={
        **experiment.model_overrides, "eval_solver": TRACE_SOLVER})
    data_config = dataclasses.replace(experiment.data, data_dir=args.data_dir,
                                      eval_batch_size=100)
    steps_per_epoch = data.dataset_info(data_config).num_train // data_config.batch_size
    state = restore_state(
        models.create(model_config(traced), rngs=nnx.Rngs(0)),
        os.path.join(workdir, "checkpoints"),
        make_optimizer(experiment.train, steps_per_epoch))
    batches = list(data.eval_batches(data_config, split="test"))
    batches = batches[:max(1, args.sweep_images // 100)]
    sweep = budget_sweep(state, batches, budgets=range(1, 9))
    results["arms"][arm] = dict(
        test_accuracy=report["test_accuracy"], test_fwd_nfe=report["test_fwd_nfe"],
        test_residual=report["test_residual"], steps=report["step"],
        train_images_per_s=report["train_images_per_s"],
        wall_time_s=report["wall_time_s"], **sweep)

  _plot(results, os.path.join(args.out, "jacreg_cifar.png"))
  with open(os.path.join(args.out, "results.json"), "w") as handle:
    json.dump(results, handle, indent=2)
  print(f"\nseed {args.seed}, {args.minutes} min per arm, schedule {args.steps} steps")
  print("arm        steps  test acc  NFE   | acc @ budget 1..8                     "
        "| iters to 1e-2 / 1e-3 (reached)")
  for arm, r in results["arms"].items():
    accs = " ".join(f"{r['accuracy'][k]:.3f}" for k in range(1, 9))
    tol = r["iterations_to_tolerance"]
    fmt = lambda t: (f"{t['mean']:.1f}" if t["mean"] is not None else "-") + \
        f" ({t['reached']:.2f})"
    print(f"{arm:<10} {r['steps']:>5}  {r['test_accuracy']:.4f}  "
          f"{r['test_fwd_nfe']:.1f} | {accs} | {fmt(tol[0.01])} / {fmt(tol[0.001])}")
  return 0


def _plot(results, path):
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for arm, r in results["arms"].items():
    budgets = sorted(r["accuracy"])
    left.plot(budgets, [r["accuracy"][k] for k in budgets], marker="o", label=arm)
    right.semilogy(np.arange(1, len(r["mean_trace"]) + 1), r["mean_trace"], label=arm)
  left.set(xlabel="forward budget (evaluations)", ylabel="test accuracy",
           title="accuracy when hard-stopped")
  right.set(xlabel="evaluation", ylabel="mean relative residual",
            title="convergence at evaluation")
  left.legend()
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())

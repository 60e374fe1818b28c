"""MDEQ-Tiny on CIFAR-10 with and without Jacobian regularization, equal CPU budget.

    python -m experiments.jacreg_cifar.main --data-dir DIR [--minutes 11.5]
        [--steps N] [--jacobian-steps M] [--gamma 0.4] [--prob 0.5] [--seed 0]

Both arms train the MDEQ-Tiny reference recipe (Adam 1e-3, cosine, no
augmentation, batch 64) for the same wall-clock budget ``--minutes``, each with its
schedule scaled to the steps it makes in that time
(``experiments.configs.mdeq_cifar.tiny_budget_experiment``). The regularized arm
adds ``γ · ‖J‖²_F / d`` on steps drawn with probability ``p`` and, as the
reference's regularized recipe does, solves with 8 forward / 7 backward Broyden
steps (9 / 8 evaluations) instead of 18 / 20 (19 / 21), so it makes more steps in
the same time. Then, as in the paper's Tables 2–3 in miniature, it measures test
accuracy with the forward solver hard-stopped after 1…8 evaluations and the
evaluations each model needs to reach relative residuals 1e-2 and 1e-3 (on the
first ``--sweep-images`` test images), and writes ``results.json`` and
``jacreg_cifar.png``. The unregularized arm is the MDEQ-Tiny run of
``experiments.optcells_compare`` (pass it there with ``--reuse``).
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
from experiments.configs import mdeq_cifar
from jdeq import data, models, ops
from jdeq.experiment import apply_overrides, finished_report, model_config, run_experiment
from jdeq.train import budget_sweep, make_optimizer, restore_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

ops.tune_cpu_runtime()  # must precede JAX's first computation

TRACE_SOLVER = jdeq.Broyden(max_iter=30, tol=1e-6, stop_mode="rel", record_trace=True)


# The regularized arm follows the reference's regularized MDEQ recipe
# (cls_mdeq_*_reg.yaml): smaller forward/backward budgets, jittered by up to ±2 on
# regularized steps. The reference regularizes a random 2-8% of the steps of runs
# that are 10⁴-10⁵ steps long; a CPU run of ~10² steps would then see almost no
# regularized step, so the miniature raises p (the --prob flag).
JACOBIAN_FORWARD_BUDGET = 8 + 1   # F_THRES 8 steps after the evaluation at z0
JACOBIAN_BACKWARD_BUDGET = 7 + 1  # B_THRES 7
JACOBIAN_BUDGET_JITTER = 2
# Regularized-arm steps per baseline step in the same minutes. Measured at batch 64
# on a 2-core x86 CPU: baseline equilibrium step 10.4 s; regularized arm 6.3 s
# without and 10 s with the 2-probe Hutchinson term (half of the steps), unrolled
# 7.9 s; the arm also compiles one step more (≈45 s).
JACOBIAN_STEP_RATIO = 1.15
# The optimization-cell comparison's budget, so that the unregularized arm is that
# comparison's MDEQ-Tiny run (``--reuse``).
DEFAULT_MINUTES = mdeq_cifar.COMPARISON_MINUTES


def arm_experiment(name: str, minutes: float, steps: int, gamma: float, prob: float,
                   seed: int):
  """The budgeted TINY recipe (``mdeq_cifar.tiny_budget_experiment``); the
  ``"jacobian"`` arm adds the regularizer with the regularized recipe's budgets."""
  experiment = mdeq_cifar.tiny_budget_experiment(
      minutes, steps, test_images=mdeq_cifar.COMPARISON_TEST_IMAGES)
  overrides = [f"train.seed={seed}"] if seed != experiment.train.seed else []
  if name == "jacobian":
    overrides += [
        f"train.jac_gamma={gamma}", f"train.jac_prob={prob}",
        "train.jac_probes=2",  # the reference estimator's two probes
        f"train.forward_budget={JACOBIAN_FORWARD_BUDGET}",
        f"train.jac_budget_jitter={JACOBIAN_BUDGET_JITTER}",
        # room above the budget for the jitter; unregularized steps stop at it
        f"model.solver.max_iter={JACOBIAN_FORWARD_BUDGET + JACOBIAN_BUDGET_JITTER}",
        f"model.eval_solver.max_iter={JACOBIAN_FORWARD_BUDGET}",
        f"model.grad.solver.max_iter={JACOBIAN_BACKWARD_BUDGET}"]
  return apply_overrides(experiment, overrides)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default="results/jacreg_cifar")
  parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                      help="wall-clock training budget of each arm")
  parser.add_argument("--steps", type=int, default=None,
                      help="baseline schedule length (default: the measured steps "
                           "of the budgeted TINY recipe, scaled to --minutes)")
  parser.add_argument("--jacobian-steps", type=int, default=None,
                      help="schedule length of the regularized arm, whose steps are "
                           f"cheaper (default: {JACOBIAN_STEP_RATIO}x --steps)")
  parser.add_argument("--gamma", type=float, default=0.4,
                      help="γ (the reference's CIFAR-10 value)")
  parser.add_argument("--prob", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep-images", type=int, default=500)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  results = dict(settings=vars(args), arms={})
  for arm in ("baseline", "jacobian"):
    steps = args.steps or round(
        mdeq_cifar.COMPARISON_STEPS * args.minutes / DEFAULT_MINUTES)
    if arm == "jacobian":
      steps = args.jacobian_steps or round(JACOBIAN_STEP_RATIO * steps)
    experiment = arm_experiment(arm, args.minutes, steps, args.gamma, args.prob,
                                args.seed)
    workdir = os.path.join(args.out, arm)
    if os.path.exists(os.path.join(workdir, "report.json")):
      report = finished_report(workdir, experiment)  # finished: not run again
    else:
      report = run_experiment(experiment, workdir=workdir, data_dir=args.data_dir,
                              name=f"jacreg_cifar/{arm}")
    traced = dataclasses.replace(experiment, model_overrides={
        **experiment.model_overrides, "eval_solver": TRACE_SOLVER})
    data_config = dataclasses.replace(experiment.data, data_dir=args.data_dir)
    steps_per_epoch = data.dataset_info(data_config).num_train // data_config.batch_size
    state = restore_state(
        models.create(model_config(traced), rngs=nnx.Rngs(0)),
        os.path.join(workdir, "checkpoints"),
        make_optimizer(experiment.train, steps_per_epoch))
    batches = list(data.eval_batches(data_config, split="test"))
    batches = batches[:max(1, args.sweep_images // data_config.eval_batch)]
    sweep = budget_sweep(state, batches, budgets=range(1, 9))
    results["arms"][arm] = dict(
        test_accuracy=report["test_accuracy"], test_fwd_nfe=report["test_fwd_nfe"],
        test_residual=report["test_residual"], steps=report["step"],
        train_images_per_s=report["train_images_per_s"],
        wall_time_s=report["wall_time_s"], **sweep)

  _plot(results, os.path.join(args.out, "jacreg_cifar.png"))
  with open(os.path.join(args.out, "results.json"), "w") as handle:
    json.dump(results, handle, indent=2)
  print(f"\nseed {args.seed}, {args.minutes} min of training per arm, γ {args.gamma}, "
        f"p {args.prob}; test accuracy on the first "
        f"{mdeq_cifar.COMPARISON_TEST_IMAGES} test images, sweeps on the first "
        f"{args.sweep_images}")
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

"""The arms of the CPU-scale DEQ-Transformer study (JR paper, Table 1 in miniature).

Every arm is the WikiText-2 experiment ``deq_transformer_wt2_small`` with the
solver budgets and regularization of one of the reference's WikiText-103 scripts
(locuslab/deq, DEQ-Sequence), the schedule scaled to the steps the arm makes in
the study's wall-clock budget:

* ``postln`` — ``wt103_deq_transformer.sh``: post-LN, no Jacobian term, Anderson
  30 / Broyden 35;
* ``postln_jr`` — ``wt103_deq_transformer_reg.sh``: post-LN, Jacobian term on 35%
  of the steps, Anderson 12 / Broyden 13;
* ``preln`` — pre-LN with the regularized script's budgets 14 / 14 and no Jacobian
  term (the paper's "pre-LN without JR", which diverged on WikiText-103);
* ``preln_jr`` — ``wt103_deq_transformer_preln_reg.sh``: pre-LN, Jacobian term on
  40% of the steps, Anderson 14 / Broyden 14.

γ starts at 0.5 in both regularized arms instead of the scripts' 1.9 and 2.0: at
this scale the scripts' γ holds the post-LN model near the unigram model's
perplexity (train perplexity about 900 after 1,400 steps of a 1,500-step schedule,
against the unigram model's 965), while from 0.1 and from 0.5 its first 300 steps
follow the same curve (train perplexity 1,092 and 1,072 at step 300 with Adam at
2e-3), the map contractive at 5–8 forward evaluations to 1e-3 in both.

Both regularized arms grow γ by 0.1 every ``N`` steps, ``N`` the reference's
35k / 30k of 300k steps scaled to the arm's schedule, and jitter the forward budget
of their regularized steps by up to 2 below the threshold (the solver's budget
caps the upper half of jdeq's symmetric jitter).
"""

from __future__ import annotations

from typing import NamedTuple

BASE_EXPERIMENT = "deq_transformer_wt2_small"

# The reference's schedule: 300k steps, of which 32k pretraining.
REFERENCE_STEPS = 300_000
PRETRAIN_SHARE = 32_000 / REFERENCE_STEPS


class Arm(NamedTuple):
  """One arm: architecture, budgets and regularization.

  Attributes:
    pre_ln: pre-LN instead of post-LN.
    forward: Anderson forward threshold (map evaluations).
    backward: Broyden backward threshold (steps after the evaluation at 0).
    gamma: initial γ (0: no Jacobian term).
    prob: share of regularized steps.
    increment_share: γ grows by 0.1 every ``increment_share · steps`` steps.
    steps_per_minute: the arm's training steps per minute on a 2-core x86 CPU,
      which sizes its schedule to the budget, compilation and the forward NFE's
      growth included: ``postln`` made 599 steps in 6 minutes, its NFE reaching
      its budget of 30 by step 300; the 12–14-budget arms stay near 5–8
      evaluations. An arm that is slower still stops at the budget, unannealed,
      and the table says so.
  """
  pre_ln: bool
  forward: int
  backward: int
  gamma: float = 0.0
  prob: float = 0.0
  increment_share: float = 0.0
  steps_per_minute: float = 100.0


ARMS = {
    "postln": Arm(pre_ln=False, forward=30, backward=35, steps_per_minute=90.0),
    "postln_jr": Arm(pre_ln=False, forward=12, backward=13, gamma=0.5, prob=0.35,
                     increment_share=35_000 / REFERENCE_STEPS, steps_per_minute=140.0),
    "preln": Arm(pre_ln=True, forward=14, backward=14, steps_per_minute=140.0),
    "preln_jr": Arm(pre_ln=True, forward=14, backward=14, gamma=0.5, prob=0.4,
                    increment_share=30_000 / REFERENCE_STEPS, steps_per_minute=130.0),
}

#: The paper's WikiText-103 figures (Bai, Koltun & Kolter 2021, Table 1 and the
#: memory comparison): test perplexity, forward NFE, training memory.
PAPER = {
    "postln": dict(perplexity=24.0, nfe=30, memory_gb=3.9,
                   note="hard-stopped at 12 NFE: 29.2"),
    "postln_jr": dict(perplexity=24.9, nfe=12, memory_gb=4.8, note="1.5x the "
                      "training time of an 18-layer Transformer-XL vs 3.1x without JR"),
    "preln": dict(perplexity=None, nfe=None, memory_gb=None, note="diverged"),
    "preln_jr": dict(perplexity=24.5, nfe=14, memory_gb=4.8, note="1.6x"),
}


def overrides(arm: Arm, steps: int, minutes: float, seed: int) -> list[str]:
  """Command-line overrides turning the base experiment into ``arm``."""
  pretrain = max(1, round(PRETRAIN_SHARE * steps))
  result = [
      f"model.pre_ln={arm.pre_ln}",
      f"model.solver.max_iter={arm.forward}",
      f"model.eval_solver.max_iter={arm.forward}",
      f"model.grad.solver.max_iter={arm.backward + 1}",
      f"model.grad.solver.memory={arm.backward}",
      f"train.total_steps={steps}", f"train.pretrain_steps={pretrain}",
      f"train.warmup_steps={max(1, round(steps * 16_000 / REFERENCE_STEPS))}",
      f"train.max_minutes={minutes}", f"train.jac_gamma={arm.gamma}",
      f"train.jac_prob={arm.prob if arm.gamma else 1.0}",
      "train.eval_every=None", f"train.seed={seed}",
  ]
  if arm.gamma:
    result += [f"train.jac_gamma_increment=0.1",
               f"train.jac_increment_every={max(1, round(arm.increment_share * steps))}",
               f"train.forward_budget={arm.forward}", "train.jac_budget_jitter=2"]
  return result

"""DEQ-Transformer language models (Bai, Koltun & Kolter, ICML 2021, Table 1).

The three WikiText-103 experiments follow the reference's training scripts
(locuslab/deq, DEQ-Sequence, ``wt103_deq_transformer*.sh`` run by
``train_transformer.py``): batch 56, segments of 150 tokens, Adam 2.5e-4 with a
16k-step linear warmup and cosine decay to step 300k, gradient clipping at 0.25,
32k pretraining steps with 2 unrolled layers, and the Jacobian penalty
``γ·‖εᵀJ‖²/(B·L·d)`` with one probe on a random share ``p`` of the steps, ``γ``
growing by 0.1 every ``N`` steps. They need WikiText-103 (the official archive as
``data.manual_dir``, or ``data.download=True``) and a GPU.

Two deliberate differences from the reference, both small:

* its cosine is a function of the absolute step, ``lr·½(1 + cos(πt/300k))`` after
  the warmup; jdeq's warmup-cosine decays over the steps after the warmup;
* its forward threshold is lowered by ``randint(0, 2)`` on every step; jdeq's
  jitter (``jac_budget_jitter``) moves the budget on the regularized steps only.

``deq_transformer_wt2_small`` is the CPU-scale model on WikiText-2 (see
``jdeq.models.deq_transformer.configs``): a short run that learns in minutes, the
base of the Jacobian-regularization study in ``experiments/jacreg_lm``.
"""

from __future__ import annotations

from experiments.configs import register
from jdeq import data
from jdeq.experiment import ExperimentConfig
from jdeq.train import TrainConfig

_WT103_DATA = data.TextDataConfig(name="wikitext103", batch_size=56, tgt_len=150,
                                  eval_tgt_len=150)
_WT103_TRAIN = dict(optimizer="adam", lr=2.5e-4, schedule="cosine", warmup_steps=16_000,
                    total_steps=300_000, grad_clip_norm=0.25, pretrain_steps=32_000,
                    log_every=200, eval_every=5_000, checkpoint_every=5_000)


def _wt103(model: str, description: str, **train) -> ExperimentConfig:
  return ExperimentConfig(model=model, data=_WT103_DATA,
                          train=TrainConfig(**_WT103_TRAIN, **train),
                          description=description)


def _wt103_jr(gamma: float, prob: float, every: int, threshold: int) -> dict:
  """The regularized scripts' Jacobian settings."""
  return dict(jac_gamma=gamma, jac_prob=prob, jac_gamma_increment=0.1,
              jac_increment_every=every, forward_budget=threshold, jac_budget_jitter=2)


@register("deq_transformer_wt103_postln")
def deq_transformer_wt103_postln() -> ExperimentConfig:
  """Post-LN DEQ-Transformer without Jacobian regularization (30/35 iterations)."""
  return _wt103("deq_transformer_wt103_postln",
                "DEQ-Transformer (post-LN) on WikiText-103 without Jacobian "
                "regularization, Anderson 30 / Broyden 35; paper: 24.0 test ppl at "
                "30 NFE.")


@register("deq_transformer_wt103_postln_jr")
def deq_transformer_wt103_postln_jr() -> ExperimentConfig:
  """Post-LN DEQ-Transformer with Jacobian regularization (12/13 iterations)."""
  return _wt103("deq_transformer_wt103_postln_jr",
                "DEQ-Transformer (post-LN) on WikiText-103 with Jacobian "
                "regularization γ 1.9 (+0.1 every 35k steps) on 35% of the steps, "
                "Anderson 12 / Broyden 13; paper: 24.9 test ppl at 12 NFE.",
                **_wt103_jr(1.9, 0.35, 35_000, 12))


@register("deq_transformer_wt103_preln_jr")
def deq_transformer_wt103_preln_jr() -> ExperimentConfig:
  """Pre-LN DEQ-Transformer with Jacobian regularization (14/14 iterations)."""
  return _wt103("deq_transformer_wt103_preln_jr",
                "DEQ-Transformer (pre-LN) on WikiText-103 with Jacobian "
                "regularization γ 2.0 (+0.1 every 30k steps) on 40% of the steps, "
                "Anderson 14 / Broyden 14; paper: 24.5 test ppl at 14 NFE (without "
                "JR the pre-LN model diverges).",
                **_wt103_jr(2.0, 0.4, 30_000, 14))


@register("deq_transformer_wt2_small")
def deq_transformer_wt2_small() -> ExperimentConfig:
  """CPU-scale post-LN DEQ-Transformer on WikiText-2 with Jacobian regularization."""
  return ExperimentConfig(
      model="deq_transformer_wt2_small",
      data=data.TextDataConfig(name="wikitext2", batch_size=16, tgt_len=64,
                               eval_batch_size=16, eval_tgt_len=64),
      train=TrainConfig(optimizer="adam", lr=1e-3, schedule="cosine", warmup_steps=100,
                        total_steps=1_500, grad_clip_norm=0.25, pretrain_steps=150,
                        jac_gamma=1.9, jac_prob=0.35, log_every=25, eval_every=500,
                        checkpoint_every=250, max_minutes=15.0),
      description="deq_transformer_wt2_small (d 128, 4 heads, d_inner 512, adaptive "
                  "softmax 2000/10000) on WikiText-2 with Jacobian regularization "
                  "(γ 1.9 on 35% of the steps), Adam 1e-3, warmup 100, cosine over "
                  "1500 steps of 16x64 tokens, 150 unrolled pretraining steps; "
                  "validation perplexity well below the unigram model's 965.")

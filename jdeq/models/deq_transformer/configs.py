"""Named DEQ-Transformer configurations: the reference's WikiText-103 models and a
CPU-scale WikiText-2 model.

WikiText-103 (locuslab/deq, DEQ-Sequence, ``wt103_deq_transformer*.sh`` with
``train_transformer.py``'s adaptive settings): ``d_model = d_embed = 700``, 10 heads
of 70, ``d_inner = 48000``, ``tgt_len = 150``, weight norm, cutoffs
20000/40000/200000 with ``div_val = 4``, tied weights and tail projections, 2
unrolled layers for pretraining, Anderson forward and Broyden backward with the
relative stop rule at 1e-3. The vocabulary is the training split's 267,734 word
types plus ``<eos>`` (267,735). Per script:

* ``deq_transformer_wt103_postln`` (``wt103_deq_transformer.sh``, no Jacobian
  regularization): ``mem_len = 150``, thresholds 30/35, dropout 0.05, dropatt 0;
* ``deq_transformer_wt103_postln_jr`` (``wt103_deq_transformer_reg.sh``):
  ``mem_len = 300``, thresholds 12/13, dropout 0.06, dropatt 0.01;
* ``deq_transformer_wt103_preln_jr`` (``wt103_deq_transformer_preln_reg.sh``): as
  the previous, pre-LN, thresholds 14/14.

WikiText-2 at CPU scale (``deq_transformer_wt2_small``, ``…_preln``): the same
architecture at ``d_model = 128``, 4 heads of 32, ``d_inner = 512``, segments and
memory of 64, an adaptive softmax with cutoffs 2000/10000 and ``div_val = 4`` over
WikiText-2's 33,278 words (frequency-sorted, ``<eos>`` included), which keeps the
softmax a small share of a step; the JR script's budgets 12/13 and no dropout
(a model this small trained for well under two epochs underfits: at 5 minutes
of training the JR arm reached validation perplexity 706 without dropout and
725 with the no-JR script's 0.05). About 1.03M parameters, 0.72M of them
embeddings.

Budgets: the reference's Anderson evaluates the map ``f_thres`` times (two plain
steps, then ``f_thres − 2`` mixed ones), so ``max_iter = f_thres``; its Broyden
takes ``b_thres`` steps after the evaluation at 0, so ``max_iter = b_thres + 1``
with ``b_thres`` rank-one pairs. The reference stops on the batch's residual; jdeq
stops each sample on its own.

Reference parameter counts: the reference model built with those arguments in
PyTorch (CPU) and its trainable tensors counted once per storage. The tail
projections are tied by sharing storage between two Parameter objects, so the
reference's own ``n_all_param`` (which counts Parameter objects) is larger by
their 159,600 entries: 97,851,488 for WikiText-103.
"""

from __future__ import annotations

import jdeq
from jdeq.models.deq_transformer.model import DEQTransformerConfig
from jdeq.models.registry import register

#: WikiText-103's vocabulary with ``<eos>`` (Transformer-XL's corpus builder).
WT103_VOCAB = 267_735
#: WikiText-2's vocabulary with ``<eos>``.
WT2_VOCAB = 33_278

_SOURCE = ("locuslab/deq@1fb7059 DEQ-Sequence/{} (adaptive settings of "
           "train_transformer.py): the reference DEQTransformerLM built in PyTorch, "
           "trainable tensors counted once per storage")


def solvers(f_thres: int, b_thres: int) -> dict:
  """Solver fields for the reference's thresholds (Anderson m=6 forward, Broyden back)."""
  forward = jdeq.Anderson(max_iter=f_thres, tol=1e-3, stop_mode="rel", m=6, ridge=1e-4)
  backward = jdeq.Broyden(max_iter=b_thres + 1, tol=1e-3, stop_mode="rel",
                          memory=b_thres)
  return dict(solver=forward, eval_solver=forward, grad=jdeq.IFT(backward))


_WT103 = dict(vocab_size=WT103_VOCAB, d_model=700, d_embed=700, n_head=10, d_head=70,
              d_inner=48_000, tgt_len=150, weight_norm=True,
              cutoffs=(20_000, 40_000, 200_000), div_val=4, unrolled_steps=2)

_WT2 = dict(vocab_size=WT2_VOCAB, d_model=128, d_embed=128, n_head=4, d_head=32,
            d_inner=512, tgt_len=64, mem_len=64, dropout=0.0, dropatt=0.0,
            weight_norm=True, cutoffs=(2_000, 10_000), div_val=4, unrolled_steps=2)
_WT2_SOURCE = ("the reference DEQTransformerLM of locuslab/deq@1fb7059 DEQ-Sequence built "
               "in PyTorch with these arguments (d_model 128, 4x32 heads, d_inner 512, "
               "cutoffs 2000/10000, div_val 4, tied weights and tail projections), "
               "trainable tensors counted once per storage")

CONFIGS = {
    "deq_transformer_wt103_postln": (
        DEQTransformerConfig(mem_len=150, dropout=0.05, dropatt=0.0, **_WT103,
                             **solvers(30, 35)),
        97_691_888, _SOURCE.format("wt103_deq_transformer.sh")),
    "deq_transformer_wt103_postln_jr": (
        DEQTransformerConfig(mem_len=300, dropout=0.06, dropatt=0.01, **_WT103,
                             **solvers(12, 13)),
        97_691_888, _SOURCE.format("wt103_deq_transformer_reg.sh")),
    "deq_transformer_wt103_preln_jr": (
        DEQTransformerConfig(mem_len=300, dropout=0.06, dropatt=0.01, pre_ln=True,
                             **_WT103, **solvers(14, 14)),
        97_691_888, _SOURCE.format("wt103_deq_transformer_preln_reg.sh")),
    "deq_transformer_wt2_small": (
        DEQTransformerConfig(**_WT2, **solvers(12, 13)),
        1_034_480, _WT2_SOURCE),
    "deq_transformer_wt2_small_preln": (
        DEQTransformerConfig(pre_ln=True, **_WT2, **solvers(12, 13)),
        1_034_480, _WT2_SOURCE),
}

for _name, (_config, _params, _source) in CONFIGS.items():
  register(_name, _config, reference_params=_params, reference_source=_source)

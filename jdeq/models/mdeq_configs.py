"""The reference MDEQ configurations, with their solver settings and parameter counts.

Every field comes from the authors' yaml files in locuslab/deq, folder MDEQ-Vision
(``experiments/{cifar,imagenet,cityscapes}/*.yaml``): branch channels, expansion (5,
6 for XL), 8 GroupNorm groups, dropout, stem downsampling, GroupNorm affine flags
(the yaml's ``POST_GN_AFFINE``, the code defaults otherwise), head widths,
``NUM_LAYERS`` (unrolled pretraining depth) and the DEQ section — Broyden
forward/backward, the stop mode, and the reference's default tolerance 1e-3.

Budgets: the reference's ``F_THRES``/``B_THRES`` count Broyden *steps* after the
evaluation at ``z0``, so a solve evaluates the map ``F_THRES + 1`` times; jdeq's
``max_iter`` counts evaluations, so it is the threshold plus one (TINY: 19 forward,
21 backward). Broyden keeps one rank-one pair per step, as the reference.

Reference parameter counts: measured by building each yaml with the reference code
(locuslab/deq commit 1fb7059, its own config system and ``get_cls_net`` /
``get_seg_net``) and counting its trainable tensors; they equal the analytic counts
of the architecture in ``lib/models/mdeq_core.py`` and ``mdeq.py``. The paper
rounds them (TINY "170K", CIFAR LARGE "10M", ImageNet SMALL "18M", LARGE "63M");
the breakdown by part is in docs/mdeq.md.
"""

from __future__ import annotations

import jdeq
from jdeq.models.mdeq import MDEQConfig
from jdeq.models.registry import register

_YAML = ("locuslab/deq@1fb7059 MDEQ-Vision/experiments/{}, built and counted with "
         "the reference code")


def _budget(f_thres: int, b_thres: int, stop_mode: str) -> dict:
  """Solver fields of a reference ``DEQ:`` section (Broyden both ways, tol 1e-3)."""
  solver = jdeq.Broyden(max_iter=f_thres + 1, tol=1e-3, stop_mode=stop_mode,
                        memory=f_thres)
  backward_solver = jdeq.Broyden(max_iter=b_thres + 1, tol=1e-3, stop_mode=stop_mode,
                                 memory=b_thres)
  return dict(solver=solver, eval_solver=solver, grad=jdeq.IFT(backward_solver))


_CIFAR = dict(num_classes=10, downsample_times=0, post_gn_affine=False,
              unrolled_steps=10, bn_momentum=0.9, **_budget(18, 20, "rel"))
_IMAGENET = dict(num_classes=1000, downsample_times=2, dropout=0.0, bn_momentum=0.9,
                 **_budget(26, 27, "abs"))
_CITYSCAPES = dict(num_classes=19, head="segmentation", downsample_times=2,
                   post_gn_affine=True, unrolled_steps=3, final_conv_kernel=1,
                   bn_momentum=0.99, **_budget(27, 30, "abs"))

CONFIGS = {
    "mdeq_cifar_tiny": (
        MDEQConfig(channels=(24, 24), head_channels=(8, 16), final_channels=200,
                   dropout=0.25, **_CIFAR),
        158_890, _YAML.format("cifar/cls_mdeq_TINY.yaml")),
    "mdeq_cifar_large": (
        MDEQConfig(channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112),
                   final_channels=1680, dropout=0.3, **_CIFAR),
        11_097_438, _YAML.format("cifar/cls_mdeq_LARGE.yaml")),
    "mdeq_imagenet_small": (
        MDEQConfig(channels=(32, 64, 128, 256), head_channels=(24, 48, 96, 192),
                   final_channels=2048, post_gn_affine=True, unrolled_steps=5,
                   **_IMAGENET),
        16_808_936, _YAML.format("imagenet/cls_mdeq_SMALL.yaml")),
    "mdeq_imagenet_large": (
        MDEQConfig(channels=(80, 160, 320, 640), head_channels=(32, 64, 128, 256),
                   final_channels=2048, post_gn_affine=True, unrolled_steps=4,
                   **_IMAGENET),
        67_063_624, _YAML.format("imagenet/cls_mdeq_LARGE.yaml")),
    "mdeq_imagenet_xl": (
        MDEQConfig(channels=(88, 176, 352, 704), expansion=6,
                   head_channels=(32, 64, 128, 256), final_channels=2048,
                   post_gn_affine=True, unrolled_steps=4, **_IMAGENET),
        90_463_280, _YAML.format("imagenet/cls_mdeq_XL.yaml")),
    "mdeq_cityscapes_small": (
        MDEQConfig(channels=(32, 64, 128, 256), dropout=0.05, **_CITYSCAPES),
        8_968_467, _YAML.format("cityscapes/seg_mdeq_SMALL.yaml")),
    "mdeq_cityscapes_large": (
        MDEQConfig(channels=(80, 160, 320, 640), dropout=0.03, **_CITYSCAPES),
        55_955_859, _YAML.format("cityscapes/seg_mdeq_LARGE.yaml")),
    "mdeq_cityscapes_xl": (
        MDEQConfig(channels=(88, 176, 352, 704), expansion=6, dropout=0.04,
                   **_CITYSCAPES),
        79_551_755, _YAML.format("cityscapes/seg_mdeq_XL.yaml")),
}

for _name, (_config, _params, _source) in CONFIGS.items():
  register(_name, _config, reference_params=_params, reference_source=_source)

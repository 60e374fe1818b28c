"""Flax NNX layers for equilibrium models.

* :class:`DEQ` — the equilibrium layer around an :class:`EquilibriumCell`, with its
  auxiliary outputs :class:`DEQAux`;
* :class:`EquilibriumModel` — the model contract, ``model(x, train=, unrolled=,
  budget=, jac_probes=) -> (output, DEQAux)``, and :class:`DEQNetwork`, the
  stem → DEQ → head shell that implements it;
* :class:`WeightNorm`, :class:`SpectralNorm` — reparameterizations of any
  Linear/Conv kernel, computed once per forward pass;
* :func:`variational_dropout_mask` — per-sample, per-channel locked dropout;
* :func:`num_params` — the scalar parameter count of a module or a Param pytree;
* :class:`GroupNorm` / :func:`group_norm_nhwc` — per-sample GroupNorm of NHWC
  features, its statistics in one shifted pass, reduced spatially first (faster on
  XLA:CPU);
* multi-resolution utilities shared by multiscale models (:class:`MultiscaleFusion`,
  :class:`UpsampleFusion`, :class:`DownsampleFusion`, :func:`group_norm`, …).
"""

from jdeq.nn.conv import Conv
from jdeq.nn.deq import (TRAIN_OUTPUTS, DEQ, DEQAux, DEQNetwork, EquilibriumCell,
                         EquilibriumModel)
from jdeq.nn.dropout import variational_dropout_mask
from jdeq.nn.group_norm import GroupNorm, group_norm_nhwc
from jdeq.nn.multiscale import (NORM_EPSILON, DownsampleFusion, MultiscaleFusion,
                                UpsampleFusion, bilinear_resize, group_norm,
                                nearest_upsample)
from jdeq.nn.params import num_params
from jdeq.nn.normalization import (SpectralNorm, SpectralVector, WeightNorm,
                                   apply_layer, call_with_kernel, effective_weight,
                                   kernel_norm)

__all__ = (
    "Conv", "DEQ", "DEQAux", "DEQNetwork", "DownsampleFusion", "EquilibriumCell",
    "EquilibriumModel", "GroupNorm",
    "MultiscaleFusion", "NORM_EPSILON", "TRAIN_OUTPUTS", "SpectralNorm", "SpectralVector",
    "UpsampleFusion", "WeightNorm", "apply_layer", "bilinear_resize",
    "call_with_kernel", "effective_weight", "group_norm", "group_norm_nhwc",
    "kernel_norm", "nearest_upsample", "num_params", "variational_dropout_mask",
)

"""The convolution layer every jdeq model uses."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jdeq import ops


def Conv(in_features: int, out_features: int, kernel_size: Any,  # pylint: disable=invalid-name
         **kwargs: Any) -> nnx.Conv:
  """An ``nnx.Conv`` computing with :func:`jdeq.ops.conv_general_dilated`.

  Same values and parameters as ``nnx.Conv``; its derivatives avoid XLA CPU's slow
  paths (weight gradients, and input gradients inside solver and scan loops), which
  otherwise dominate equilibrium training on a CPU. Any ``nnx.Conv`` option can be
  passed, including another ``conv_general_dilated``.
  """
  kwargs.setdefault("conv_general_dilated", ops.conv_general_dilated)
  return nnx.Conv(in_features, out_features, kernel_size, **kwargs)

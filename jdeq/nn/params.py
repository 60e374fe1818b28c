"""Counting parameters: the one counter that models, training and scripts share."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx


def num_params(tree: Any) -> int:
  """Number of scalar parameters.

  Args:
    tree: an NNX module (its ``nnx.Param`` variables are counted; an abstract
      module from ``nnx.eval_shape`` works too) or a pytree of arrays or shape
      structs (e.g. a train state's Param state).
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

"""Pytrees of batched arrays seen as one vector per sample.

A DEQ state may be any pytree (for MDEQ, a list of feature maps at several
resolutions) whose leaves share a leading batch axis ``B``. Solvers work on the
per-sample concatenation of all leaves, an array of shape ``(B, D)``, so that every
decision (residual, convergence, Anderson mixing weights) is taken per sample.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

# The state dtypes the solvers accept. Half-precision states are refused: with
# 8 (bfloat16) or 11 (float16) bits of precision the default tolerances are out
# of reach and residual norms lose their meaning.
SOLVER_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


class BatchedLayout(NamedTuple):
  """How to go from a batched pytree to ``(B, D)`` and back (static data only)."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]  # per-sample shapes of the leaves
  dtype: Any
  batch_size: int

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def dim(self) -> int:
    return sum(self.sizes)


def layout_of(tree: PyTree, what: str = "z0") -> BatchedLayout:
  """Reads the layout of a batched pytree, checking that it is one.

  Raises:
    ValueError: if the tree is empty, a leaf has no batch axis, the leaves disagree
      on the batch size, or on the dtype (the solver mixes them in one vector), or
      the dtype is not float32 or float64 (half-precision states are refused: see
      ``SOLVER_DTYPES``).
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    raise ValueError(f"{what} must contain at least one array")
  shapes, batch_sizes, dtypes = [], set(), set()
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) < 1:
      raise ValueError(
          f"every leaf of {what} needs a leading batch axis; got a scalar leaf")
    batch_sizes.add(shape[0])
    shapes.append(tuple(shape[1:]))
    dtypes.add(jnp.result_type(leaf))
  if len(batch_sizes) != 1:
    raise ValueError(
        f"all leaves of {what} must share the leading batch size; got "
        f"{sorted(batch_sizes)}")
  if len(dtypes) != 1:
    raise ValueError(
        f"all leaves of {what} must share one dtype; got {sorted(map(str, dtypes))}")
  dtype = dtypes.pop()
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{what} must be floating point (float32 or float64); got dtype "
                     f"{dtype}")
  if dtype not in SOLVER_DTYPES:
    raise ValueError(
        f"{what} has dtype {dtype}; the solvers run in float32 or float64 only (at "
        f"{jnp.finfo(dtype).nmant + 1} bits of precision a residual tolerance below "
        f"{float(jnp.finfo(dtype).eps):.0e} is out of reach): cast the state, e.g. "
        f"z0.astype(jnp.float32), and let the map compute in lower precision inside")
  return BatchedLayout(treedef, tuple(shapes), dtype, batch_sizes.pop())


def flatten(tree: PyTree, layout: BatchedLayout) -> jax.Array:
  """Concatenates the leaves of ``tree`` per sample into a ``(B, D)`` array."""
  leaves = jax.tree.leaves(tree)
  flat = [jnp.reshape(leaf, (layout.batch_size, -1)) for leaf in leaves]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)


def unflatten(flat: jax.Array, layout: BatchedLayout) -> PyTree:
  """Inverse of :func:`flatten`."""
  if len(layout.shapes) == 1:
    pieces = [flat]
  else:
    offsets = [sum(layout.sizes[:i]) for i in range(1, len(layout.sizes))]
    pieces = jnp.split(flat, offsets, axis=1)
  leaves = [jnp.reshape(piece, (layout.batch_size,) + shape)
            for piece, shape in zip(pieces, layout.shapes)]
  return jax.tree.unflatten(layout.treedef, leaves)


def check_same_structure(expected: PyTree, actual: PyTree, what: str) -> None:
  """Raises a ValueError naming the first difference of structure, shape or dtype."""
  expected_def = jax.tree.structure(expected)
  actual_def = jax.tree.structure(actual)
  if expected_def != actual_def:
    raise ValueError(
        f"{what}: pytree structure {actual_def} differs from the state's "
        f"{expected_def}")
  for i, (e, a) in enumerate(zip(jax.tree.leaves(expected), jax.tree.leaves(actual))):
    if jnp.shape(e) != jnp.shape(a):
      raise ValueError(
          f"{what}: leaf {i} has shape {jnp.shape(a)}, the state's has {jnp.shape(e)}")
    if jnp.result_type(e) != jnp.result_type(a):
      raise ValueError(
          f"{what}: leaf {i} has dtype {jnp.result_type(a)}, the state's has "
          f"{jnp.result_type(e)} (the map must keep the state's dtype: cast z0 to "
          f"the dtype of the map's arguments, or the map's output to z0's)")


def flat_function(fn: Callable[[PyTree], PyTree],
                  layout: BatchedLayout) -> Callable[[jax.Array], jax.Array]:
  """Wraps a pytree-to-pytree map as a ``(B, D) -> (B, D)`` map."""
  return lambda flat: flatten(fn(unflatten(flat, layout)), layout)


def per_sample_sum(tree: PyTree) -> jax.Array:
  """``Σ`` over every axis but the leading batch axis, summed over the leaves: ``(B,)``."""
  sums = [jnp.sum(jnp.reshape(leaf, (jnp.shape(leaf)[0], -1)), axis=1)
          for leaf in jax.tree.leaves(tree)]
  return functools.reduce(operator.add, sums)


def per_sample_dot(x: PyTree, y: PyTree) -> jax.Array:
  """Per-sample inner products ``⟨x_b, y_b⟩`` of two batched pytrees (or ``(B, D)`` arrays)."""
  return per_sample_sum(jax.tree.map(jnp.multiply, x, y))


def per_sample_norm(x: PyTree) -> jax.Array:
  """Per-sample Euclidean norms ``‖x_b‖`` of a batched pytree (or a ``(B, D)`` array)."""
  return jnp.sqrt(per_sample_dot(x, x))

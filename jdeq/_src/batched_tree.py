"""Pytrees of batched arrays seen as one vector per sample.

A DEQ state may be any pytree (for MDEQ, a list of feature maps at several
resolutions) whose leaves share a leading batch axis ``B``. Solvers work on the
per-sample concatenation of all leaves, an array of shape ``(B, D)``, so that every
decision (residual, convergence, Anderson mixing weights) is taken per sample.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


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
      on the batch size, or on the dtype (the solver mixes them in one vector).
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
    raise ValueError(f"{what} must be floating point; got dtype {dtype}")
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
          f"{jnp.result_type(e)}")


def flat_function(fn: Callable[[PyTree], PyTree],
                  layout: BatchedLayout) -> Callable[[jax.Array], jax.Array]:
  """Wraps a pytree-to-pytree map as a ``(B, D) -> (B, D)`` map."""
  return lambda flat: flatten(fn(unflatten(flat, layout)), layout)


def per_sample_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm of each row of a ``(B, D)`` array."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=1))


def per_sample_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  """Row-wise inner products of two ``(B, D)`` arrays."""
  return jnp.sum(x * y, axis=1)

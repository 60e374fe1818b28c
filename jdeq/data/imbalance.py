"""Imbalanced training subsets: K_A majority classes of n_A examples, K_B of n_A // R.

The subset is a fixed list of example indices into the training split, so the
pipeline shuffles, augments and resumes it exactly like a full split.
"""

from __future__ import annotations

import numpy as np

from jdeq.data.config import Imbalance


def majority_classes(imbalance: Imbalance, num_classes: int) -> np.ndarray:
  """The labels of the ``K_A`` majority classes, in the order they were chosen."""
  return _class_order(imbalance, num_classes)[:imbalance.majority_classes]


def _class_order(imbalance: Imbalance, num_classes: int) -> np.ndarray:
  if imbalance.majority_classes > num_classes:
    raise ValueError(f"Imbalance: majority_classes={imbalance.majority_classes} "
                     f"exceeds the dataset's {num_classes} classes")
  if imbalance.class_seed is None:
    return np.arange(num_classes)
  return np.random.default_rng(imbalance.class_seed).permutation(num_classes)


def per_class_counts(imbalance: Imbalance, num_classes: int) -> np.ndarray:
  """``counts[c]``: n_A for a majority class ``c``, n_B = n_A // R otherwise."""
  counts = np.full(num_classes, imbalance.n_minority, np.int64)
  counts[majority_classes(imbalance, num_classes)] = imbalance.n_majority
  return counts


def subset_indices(imbalance: Imbalance, labels: np.ndarray,
                   num_classes: int) -> np.ndarray:
  """Sorted indices into ``labels`` of the examples the subset keeps.

  Args:
    imbalance: the subset's definition.
    labels: int labels of the whole split, shape (N,).
    num_classes: number of classes.

  Raises:
    ValueError: a class has fewer examples than the subset asks for.
  """
  counts = per_class_counts(imbalance, num_classes)
  rng = None if imbalance.seed is None else np.random.default_rng(
      [imbalance.seed, 1])
  kept = []
  for label, count in enumerate(counts):
    members = np.flatnonzero(labels == label)
    if len(members) < count:
      raise ValueError(f"Imbalance: class {label} has {len(members)} examples, the "
                       f"subset asks for {count}")
    if rng is not None:
      members = rng.permutation(members)
    kept.append(members[:count])
  return np.sort(np.concatenate(kept))

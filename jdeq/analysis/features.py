"""Collecting a classifier's features ``H`` (the input of its final linear layer) and
logits over a split."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from jdeq.analysis.neural_collapse import NCAccumulator, NCMetrics

# images -> (features (B, D), logits (B, K)); typically jitted.
Forward = Callable[[Any], tuple[Any, Any]]


class SplitFeatures(NamedTuple):
  """Features, logits and labels of the real (unpadded) samples of a split.

  Attributes:
    features: ``(N, D)``, the classifier's inputs.
    logits: ``(N, K)``.
    labels: ``(N,)`` int64.
  """
  features: np.ndarray
  logits: np.ndarray
  labels: np.ndarray

  def accuracy(self, classes: Optional[Iterable[int]] = None) -> float:
    """Top-1 accuracy, over the samples whose label is in ``classes`` (None: all)."""
    keep = (np.ones(len(self.labels), bool) if classes is None
            else np.isin(self.labels, np.asarray(list(classes))))
    if not keep.any():
      return float("nan")
    return float(np.mean(np.argmax(self.logits[keep], 1) == self.labels[keep]))


def extract_features(forward: Forward, batches: Iterable[Mapping[str, Any]], *,
                     max_batches: Optional[int] = None) -> SplitFeatures:
  """Runs ``forward`` over ``batches`` and gathers ``H``, logits and labels on the host.

  Works for any classifier: ``forward(images)`` returns the input of its final linear
  layer and its logits. For a jdeq classifier,
  ``jdeq.models.neural_collapse.final_linear_features(model)`` is such a function
  (and the study's ``NCClassifier`` has it as ``features_and_logits``). Batches are mappings with ``"image"`` and ``"label"`` and
  optionally ``"mask"`` (1 real, 0 padding; padded rows are dropped), as
  :func:`jdeq.data.eval_batches` yields them.

  Args:
    forward: ``images -> (features (B, D), logits (B, K))``.
    batches: the split.
    max_batches: stop after this many batches (None: all).

  Returns:
    :class:`SplitFeatures` in float32 (or the forward's dtype).
  """
  features, logits, labels = [], [], []
  for index, batch in enumerate(batches):
    if max_batches is not None and index >= max_batches:
      break
    batch_features, batch_logits = forward(batch["image"])
    keep = (np.ones(len(batch["label"]), bool) if batch.get("mask") is None
            else np.asarray(batch["mask"]) > 0)
    features.append(np.asarray(batch_features)[keep])
    logits.append(np.asarray(batch_logits)[keep])
    labels.append(np.asarray(batch["label"]).astype(np.int64)[keep])
  if not labels:
    raise ValueError("extract_features: the split produced no batches")
  return SplitFeatures(np.concatenate(features), np.concatenate(logits),
                       np.concatenate(labels))


def streaming_neural_collapse(forward: Forward,
                              batches: Callable[[], Iterable[Mapping[str, Any]]],
                              weight, bias=None, *, num_classes: int,
                              minority_classes=(), centering: str = "classes",
                              dtype=np.float64) -> NCMetrics:
  """NC metrics of a split too large to hold, from two passes of ``forward``.

  ``batches()`` must yield the same split twice (an evaluation pass is
  deterministic); memory is ``O(K·D + D²)`` (see :class:`NCAccumulator`).
  """
  accumulator = None
  for batch in batches():
    h, _ = forward(batch["image"])
    h = np.asarray(h)
    if accumulator is None:
      accumulator = NCAccumulator(num_classes, h.shape[1], dtype)
    accumulator.add_means(h, batch["label"], batch.get("mask"))
  if accumulator is None:
    raise ValueError("streaming_neural_collapse: the split produced no batches")
  accumulator.finish_means(minority_classes=minority_classes, centering=centering)
  for batch in batches():
    h, _ = forward(batch["image"])
    accumulator.add_within(h, batch["label"], weight, bias, batch.get("mask"))
  return accumulator.result(weight)

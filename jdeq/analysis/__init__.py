"""Diagnostics over features and trained models: neural-collapse metrics.

* :func:`neural_collapse` — NC1–NC4, minority collapse, equinorm and per-group
  metrics of features ``H`` under a linear classifier ``W`` (all at once);
* :class:`NCAccumulator` — the same metrics from batches, in two passes with
  ``O(K·D + D²)`` memory and float64 sums;
* :func:`extract_features` / :func:`streaming_neural_collapse` — ``H`` and logits of
  a classifier over a split.

Pure JAX/numpy: no Flax, no input pipelines.
"""

from jdeq.analysis.features import (SplitFeatures, extract_features,
                                    streaming_neural_collapse)
from jdeq.analysis.neural_collapse import (CENTERINGS, NCAccumulator, NCMetrics,
                                           etf_error, mean_pairwise_cosine,
                                           neural_collapse)

__all__ = (
    "CENTERINGS", "NCAccumulator", "NCMetrics", "SplitFeatures", "etf_error",
    "extract_features", "mean_pairwise_cosine", "neural_collapse",
    "streaming_neural_collapse",
)

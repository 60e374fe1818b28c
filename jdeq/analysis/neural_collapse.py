"""Neural-collapse (NC) metrics of the features a classifier feeds its last linear layer.

Notation: ``N`` samples ``h_i ∈ R^D`` (rows of ``H``) with labels ``y_i ∈ {0…K−1}``,
a linear classifier ``W ∈ R^{K×D}`` (one row ``w_k`` per class) and bias ``b``.

* class means ``μ_k = (1/n_k) Σ_{y_i=k} h_i``; the global mean ``μ_G`` is the mean of
  the class means (``centering="classes"``, Papyan et al.) or of all samples
  (``centering="samples"``, ``Σ_k n_k μ_k / N``; Zhu et al., Fang et al.); the two
  agree exactly on balanced data. ``M̃`` has rows ``μ̃_k = μ_k − μ_G``.
* ``Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ``, ``Σ_B = (1/K) M̃ᵀM̃``.
* NC1 ``= tr(Σ_W Σ_B⁺) / K``, the pseudo-inverse taken on the top ``K − 1``
  directions of ``Σ_B`` (the rank of the class-centered means), written as
  ``Σ_j (K / s_j²) v_jᵀ Σ_W v_j / K`` over the singular pairs ``(s_j, v_j)`` of ``M̃``,
  so it is a sum of non-negative terms.
* ETF error ``E(G) = ‖G/‖G‖_F − (I_K − 11ᵀ/K)/√(K−1)‖_F``; NC2 ``= E(WWᵀ)``,
  ``nc2_means = E(M̃M̃ᵀ)``.
* NC3 ``= ‖W/‖W‖_F − M̃/‖M̃‖_F‖_F`` (self-duality).
* NC4 = fraction of samples where ``argmax_k (W h + b)_k`` differs from the nearest
  class mean ``argmin_k ‖h − μ_k‖₂``.
* minority collapse: the mean off-diagonal cosine among the minority rows of ``W``
  (``minority_cos_w``) and of ``M̃`` (``minority_cos_means``); 1 when they collapse
  onto one direction, ``−1/(K−1)`` for a simplex ETF; NaN with fewer than two
  minority classes.
* equinorm: coefficient of variation (population std / mean) of ``‖w_k‖`` and of
  ``‖μ̃_k‖``.
* per-group NC1: ``tr(Σ_W^{(g)} Σ_B⁺) / K`` with ``Σ_W^{(g)}`` the within-class
  covariance of the samples of group ``g`` (majority or minority classes), averaged
  over those ``N_g`` samples, and the same ``Σ_B`` as NC1; so
  ``nc1 = (N_A nc1_majority + N_B nc1_minority) / N``.
* norm ratios: mean ``‖w_k‖`` over the majority classes divided by the mean over the
  minority classes (``norm_ratio_w``), and the same for ``‖μ̃_k‖``.

Every metric is invariant to scaling ``H`` (with ``b``) and ``W`` by positive factors.
:func:`neural_collapse` computes them from a whole split at once;
:class:`NCAccumulator` from batches in two passes (class sums and counts, then
``Σ_W`` and the NC4 disagreements), with memory ``O(K·D + D²)`` and float64 sums.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

CENTERINGS = ("classes", "samples")


class NCMetrics(NamedTuple):
  """Neural-collapse metrics (see the module docstring for the definitions).

  Attributes:
    nc1: ``tr(Σ_W Σ_B⁺)/K`` (within-class variability collapse; 0 at collapse).
    nc2: ETF error of ``WWᵀ``.
    nc2_means: ETF error of ``M̃M̃ᵀ``.
    nc3: ``‖W/‖W‖_F − M̃/‖M̃‖_F‖_F`` (self-duality).
    nc4: classifier vs nearest-class-mean disagreement rate.
    minority_cos_w: mean pairwise cosine of the minority rows of ``W``.
    minority_cos_means: mean pairwise cosine of the minority rows of ``M̃``.
    equinorm_w: coefficient of variation of ``‖w_k‖``.
    equinorm_means: coefficient of variation of ``‖μ̃_k‖``.
    nc1_majority: NC1 of the majority classes' samples (same ``Σ_B``).
    nc1_minority: NC1 of the minority classes' samples (NaN without minority).
    norm_ratio_w: mean majority ``‖w_k‖`` / mean minority ``‖w_k‖``.
    norm_ratio_means: mean majority ``‖μ̃_k‖`` / mean minority ``‖μ̃_k‖``.
  """
  nc1: np.ndarray
  nc2: np.ndarray
  nc2_means: np.ndarray
  nc3: np.ndarray
  nc4: np.ndarray
  minority_cos_w: np.ndarray
  minority_cos_means: np.ndarray
  equinorm_w: np.ndarray
  equinorm_means: np.ndarray
  nc1_majority: np.ndarray
  nc1_minority: np.ndarray
  norm_ratio_w: np.ndarray
  norm_ratio_means: np.ndarray

  def as_dict(self) -> dict[str, float]:
    """The metrics as Python floats (for JSON)."""
    return {name: float(value) for name, value in self._asdict().items()}


def etf_error(gram: np.ndarray) -> np.ndarray:
  """``E(G) = ‖G/‖G‖_F − (I_K − 11ᵀ/K)/√(K−1)‖_F`` for a ``(K, K)`` Gram matrix."""
  k = gram.shape[0]
  target = (np.eye(k, dtype=gram.dtype) - 1.0 / k) / np.sqrt(k - 1.0)
  return np.linalg.norm(gram / np.linalg.norm(gram) - target)


def mean_pairwise_cosine(rows: np.ndarray) -> np.ndarray:
  """Mean off-diagonal cosine similarity among ``rows`` (NaN with fewer than two)."""
  count = rows.shape[0]
  if count < 2:
    return np.asarray(np.nan, rows.dtype)
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  cosines = unit @ unit.T
  return (np.sum(cosines) - np.trace(cosines)) / (count * (count - 1))


def _coefficient_of_variation(values: np.ndarray) -> np.ndarray:
  return np.std(values) / np.mean(values)


def _group_mean_ratio(norms: np.ndarray, majority: np.ndarray) -> np.ndarray:
  if majority.all() or not majority.any():
    return np.asarray(np.nan, norms.dtype)
  return np.mean(norms[majority]) / np.mean(norms[~majority])


def _check_common(num_classes: int, minority_classes: Sequence[int],
                  centering: str) -> np.ndarray:
  if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
    raise ValueError(f"neural_collapse: num_classes must be an int >= 2, got "
                     f"{num_classes!r}")
  if centering not in CENTERINGS:
    raise ValueError(f"neural_collapse: centering must be one of {CENTERINGS}, got "
                     f"{centering!r}")
  minority = np.asarray(list(minority_classes), np.int64).reshape(-1)
  if minority.size and (minority.min() < 0 or minority.max() >= num_classes):
    raise ValueError(f"neural_collapse: minority_classes {minority.tolist()} must lie "
                     f"in [0, {num_classes})")
  if len(set(minority.tolist())) != minority.size:
    raise ValueError(f"neural_collapse: minority_classes {minority.tolist()} has "
                     "repeated classes")
  majority = np.ones(num_classes, bool)
  majority[minority] = False
  return majority


def _check_counts(counts: np.ndarray) -> None:
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    raise ValueError(f"neural_collapse: classes {missing.tolist()} have no samples; "
                     "every class needs at least one")


def _check_classifier(weight, bias, num_classes: int, dim: int):
  weight = np.asarray(weight)
  if weight.shape != (num_classes, dim):
    raise ValueError(f"neural_collapse: weight must have shape (K, D) = "
                     f"({num_classes}, {dim}), got {weight.shape}")
  if bias is not None:
    bias = np.asarray(bias)
    if bias.shape != (num_classes,):
      raise ValueError(f"neural_collapse: bias must have shape ({num_classes},), got "
                       f"{bias.shape}")
  return weight, bias


def _between_class(sums, counts, centering: str):
  """``(μ, M̃, μ_G)`` from class sums ``(K, D)`` and counts ``(K,)``."""
  means = sums / counts[:, None]
  if centering == "classes":
    global_mean = np.mean(means, axis=0)
  else:
    global_mean = np.sum(sums, axis=0) / np.sum(counts)
  return means, means - global_mean, global_mean


def _inverse_directions(centered_means):
  """``(V_r, K/s_r²)``: top ``K−1`` right singular vectors of ``M̃`` and the
  eigenvalues of ``Σ_B⁺`` on them (directions with ``s`` below ``1e-12·s_max``,
  numerically absent, are dropped)."""
  k = centered_means.shape[0]
  _, singular, vt = np.linalg.svd(centered_means, full_matrices=False)
  rank = min(k - 1, singular.shape[0])
  singular, vt = singular[:rank], vt[:rank]
  keep = singular > 1e-12 * singular[0]
  safe = np.where(keep, singular, 1.0)
  return vt, np.where(keep, k / safe ** 2, 0.0)


def _nc1_from_projected(projected_scatter, inverse_eigenvalues, k):
  """``Σ_j λ_j v_jᵀ Σ v_j / K`` from ``diag(V Σ Vᵀ)``, clipped at 0 against rounding."""
  return np.sum(inverse_eigenvalues * np.maximum(projected_scatter, 0.0)) / k


def _from_statistics(*, within_diag, group_within_diag, group_counts,
                     inverse_eigenvalues, centered_means, weight, disagreements,
                     num_samples, majority) -> NCMetrics:
  """Assembles the metrics; ``within_diag[j] = v_jᵀ Σ_W v_j`` and likewise per group."""
  k = centered_means.shape[0]
  dtype = centered_means.dtype
  nan = np.asarray(np.nan, dtype)
  nc1 = _nc1_from_projected(within_diag, inverse_eigenvalues, k)
  group_nc1 = []
  for index in range(2):
    if group_counts[index] == 0:
      group_nc1.append(nan)
    else:
      group_nc1.append(_nc1_from_projected(group_within_diag[index],
                                           inverse_eigenvalues, k))
  weight = weight.astype(dtype)
  w_norms = np.linalg.norm(weight, axis=1)
  mean_norms = np.linalg.norm(centered_means, axis=1)
  minority = ~majority
  return NCMetrics(
      nc1=nc1,
      nc2=etf_error(weight @ weight.T),
      nc2_means=etf_error(centered_means @ centered_means.T),
      nc3=np.linalg.norm(weight / np.linalg.norm(weight)
                          - centered_means / np.linalg.norm(centered_means)),
      nc4=np.asarray(disagreements / num_samples, dtype),
      minority_cos_w=mean_pairwise_cosine(weight[minority]),
      minority_cos_means=mean_pairwise_cosine(centered_means[minority]),
      equinorm_w=_coefficient_of_variation(w_norms),
      equinorm_means=_coefficient_of_variation(mean_norms),
      nc1_majority=group_nc1[0],
      nc1_minority=group_nc1[1],
      norm_ratio_w=_group_mean_ratio(w_norms, majority),
      norm_ratio_means=_group_mean_ratio(mean_norms, majority))


def _disagreements(features, means, weight, bias):
  """Number of samples whose classifier decision differs from the nearest mean."""
  logits = features @ weight.T
  if bias is not None:
    logits = logits + bias
  # ‖h − μ_k‖² = ‖h‖² − 2 h·μ_k + ‖μ_k‖²; the ‖h‖² term does not change the argmin.
  distances = np.sum(means ** 2, axis=1) - 2.0 * features @ means.T
  return np.sum(np.argmax(logits, axis=1) != np.argmin(distances, axis=1))


def neural_collapse(features, labels, weight, bias=None, *, num_classes: int,
                    minority_classes: Sequence[int] = (),
                    centering: str = "classes") -> NCMetrics:
  """Neural-collapse metrics of ``features`` under the linear classifier ``weight``.

  Args:
    features: ``H``, shape ``(N, D)``: the classifier's inputs.
    labels: int labels, shape ``(N,)``, in ``[0, num_classes)``; every class must
      occur.
    weight: ``W``, shape ``(K, D)`` (``logits = H Wᵀ + b``; note the transpose of a
      Flax kernel).
    bias: ``b``, shape ``(K,)``, or None (used by NC4 only).
    num_classes: ``K >= 2``.
    minority_classes: labels of the minority classes (empty: none).
    centering: ``"classes"``: ``μ_G`` is the mean of the class means;
      ``"samples"``: the mean of all samples.

  Returns:
    :class:`NCMetrics` of float64 scalars (computed in float64 with numpy on the
    host, whatever the dtype of ``features``).
  """
  majority = _check_common(num_classes, minority_classes, centering)
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"neural_collapse: features must be (N, D), got {features.shape}")
  labels_np = np.asarray(labels).astype(np.int64).reshape(-1)
  if labels_np.shape[0] != features.shape[0]:
    raise ValueError(f"neural_collapse: {labels_np.shape[0]} labels for "
                     f"{features.shape[0]} feature rows")
  if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= num_classes):
    raise ValueError(f"neural_collapse: labels must lie in [0, {num_classes})")
  counts_np = np.bincount(labels_np, minlength=num_classes)
  _check_counts(counts_np)
  weight, bias = _check_classifier(weight, bias, num_classes, features.shape[1])
  dtype = np.float64
  features = features.astype(dtype)
  labels = labels_np
  one_hot = (labels[:, None] == np.arange(num_classes)).astype(dtype)
  counts = np.asarray(counts_np, dtype)
  sums = one_hot.T @ features
  means, centered_means, _ = _between_class(sums, counts, centering)
  vt, inverse_eigenvalues = _inverse_directions(centered_means)
  projected = (features - means[labels]) @ vt.T  # (N, r): (h_i − μ_{y_i})·v_j
  squares = projected ** 2
  in_majority = np.asarray(majority)[labels]
  group_counts = (int(counts_np[majority].sum()), int(counts_np[~majority].sum()))
  group_diag = [np.sum(np.where(mask[:, None], squares, 0.0), axis=0)
                / max(count, 1) for mask, count in
                zip((in_majority, ~in_majority), group_counts)]
  bias_cast = None if bias is None else bias.astype(dtype)
  return _from_statistics(
      within_diag=np.mean(squares, axis=0),
      group_within_diag=group_diag, group_counts=group_counts,
      inverse_eigenvalues=inverse_eigenvalues, centered_means=centered_means,
      weight=weight,
      disagreements=_disagreements(features, means, weight.astype(dtype),
                                   bias_cast),
      num_samples=features.shape[0], majority=majority)


class NCAccumulator:
  """Neural-collapse metrics over batches, equal to :func:`neural_collapse` at once.

  Two passes over the split::

    acc = NCAccumulator(num_classes=10, dim=D)
    for h, y in batches: acc.add_means(h, y)            # pass 1: class sums, counts
    acc.finish_means(minority_classes=..., centering=...)
    for h, y in batches: acc.add_within(h, y, weight, bias)  # pass 2: Σ_W, NC4
    metrics = acc.result(weight)

  Memory is ``O(K·D + D²)`` (class sums, the within-class scatter of each group);
  sums are kept on the host in ``dtype`` (float64 by default, whatever JAX's
  precision mode), and pass 2 accumulates ``(h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ`` around
  the finished means, which avoids the cancellation of a one-pass second moment.

  Args:
    num_classes: ``K``.
    dim: feature dimension ``D``.
    dtype: accumulation dtype (numpy).
  """

  def __init__(self, num_classes: int, dim: int, dtype=np.float64):
    self.num_classes = int(num_classes)
    self.dim = int(dim)
    self.dtype = np.dtype(dtype)
    self.sums = np.zeros((self.num_classes, self.dim), self.dtype)
    self.counts = np.zeros(self.num_classes, np.int64)
    self._means = None
    self._scatter = np.zeros((2, self.dim, self.dim), self.dtype)  # majority, minority
    self._disagreements = 0
    self._samples_second = 0

  def _prepare(self, features, labels, mask):
    features = np.asarray(features, self.dtype)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"NCAccumulator: features must be (B, {self.dim}), got "
                       f"{features.shape}")
    if labels.shape[0] != features.shape[0]:
      raise ValueError("NCAccumulator: one label per feature row is needed")
    if mask is not None:
      keep = np.asarray(mask).reshape(-1) > 0
      features, labels = features[keep], labels[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"NCAccumulator: labels must lie in [0, {self.num_classes})")
    return features, labels

  def add_means(self, features, labels, mask=None) -> None:
    """Pass 1: adds a batch to the class sums and counts (``mask`` 0 drops rows)."""
    if self._means is not None:
      raise ValueError("NCAccumulator: the means are finished; add_means belongs to "
                       "the first pass")
    features, labels = self._prepare(features, labels, mask)
    np.add.at(self.sums, labels, features)
    self.counts += np.bincount(labels, minlength=self.num_classes)

  def finish_means(self, *, minority_classes: Sequence[int] = (),
                   centering: str = "classes") -> None:
    """Ends pass 1: fixes the class means, the grouping and the centering."""
    self._majority = _check_common(self.num_classes, minority_classes, centering)
    self._centering = centering
    _check_counts(self.counts)
    self._means = self.sums / self.counts[:, None]

  def add_within(self, features, labels, weight, bias=None, mask=None) -> None:
    """Pass 2: adds a batch to the within-class scatter and the NC4 count."""
    if self._means is None:
      raise ValueError("NCAccumulator: call finish_means() after the first pass")
    features, labels = self._prepare(features, labels, mask)
    weight = np.asarray(weight, self.dtype)
    if weight.shape != (self.num_classes, self.dim):
      raise ValueError(f"NCAccumulator: weight must be ({self.num_classes}, "
                       f"{self.dim}), got {weight.shape}")
    deviations = features - self._means[labels]
    in_majority = self._majority[labels]
    for group, rows in enumerate((in_majority, ~in_majority)):
      part = deviations[rows]
      self._scatter[group] += part.T @ part
    logits = features @ weight.T
    if bias is not None:
      logits = logits + np.asarray(bias, self.dtype)
    distances = np.sum(self._means ** 2, axis=1) - 2.0 * features @ self._means.T
    self._disagreements += int(np.sum(np.argmax(logits, 1) != np.argmin(distances, 1)))
    self._samples_second += features.shape[0]

  def within_class_covariance(self) -> np.ndarray:
    """``Σ_W`` from the second pass, shape ``(D, D)``."""
    return self._scatter.sum(0) / max(self._samples_second, 1)

  def result(self, weight) -> NCMetrics:
    """The metrics (the second pass must have covered every sample of the first)."""
    if self._means is None:
      raise ValueError("NCAccumulator: call finish_means() after the first pass")
    total = int(self.counts.sum())
    if self._samples_second != total:
      raise ValueError(f"NCAccumulator: the second pass saw {self._samples_second} "
                       f"samples, the first {total}")
    weight, _ = _check_classifier(weight, None, self.num_classes, self.dim)
    dtype = np.float64
    sums = np.asarray(self.sums, dtype)
    counts = np.asarray(self.counts, dtype)
    _, centered_means, _ = _between_class(sums, counts, self._centering)
    vt, inverse_eigenvalues = _inverse_directions(centered_means)
    vt_np = np.asarray(vt, self.dtype)

    def projected(scatter, count):
      return np.asarray(np.einsum("jd,de,je->j", vt_np, scatter, vt_np)
                         / max(count, 1), dtype)

    group_counts = (int(self.counts[self._majority].sum()),
                    int(self.counts[~self._majority].sum()))
    return _from_statistics(
        within_diag=projected(self._scatter.sum(0), total),
        group_within_diag=[projected(self._scatter[g], group_counts[g])
                           for g in range(2)],
        group_counts=group_counts, inverse_eigenvalues=inverse_eigenvalues,
        centered_means=centered_means, weight=weight,
        disagreements=self._disagreements, num_samples=total,
        majority=self._majority)

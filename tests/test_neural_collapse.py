"""Neural-collapse metrics (jdeq.analysis) on constructed features, in float64."""

import math

import numpy as np
import pytest

from jdeq import analysis

FIELDS = analysis.NCMetrics._fields


def _etf_problem(k=5, d=8, counts=(3, 4, 2, 5, 6), seed=0, scale=2.0):
  """An exact simplex ETF of class means (no within-class spread), W = c·M̃,
  b = −W μ_G."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  etf = math.sqrt(k / (k - 1)) * (np.eye(k) - 1.0 / k)  # (K, K), rows sum to 0
  centered = etf @ rotation[:k]  # (K, D)
  global_mean = rng.normal(size=d)
  labels = np.repeat(np.arange(k), counts)
  features = global_mean + centered[labels]
  weight = scale * centered
  bias = -weight @ global_mean
  return features, labels, weight, bias


def _random_problem(k=4, d=6, counts=(30, 20, 5, 8), seed=1):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k), counts)
  means = rng.normal(size=(k, d)) * 2
  features = means[labels] + rng.normal(size=(len(labels), d))
  weight = rng.normal(size=(k, d))
  bias = rng.normal(size=k)
  return features, labels, weight, bias


def _numpy_reference(features, labels, weight, bias, k, minority, centering):
  """An independent float64 numpy implementation of the issue's formulas."""
  features = np.asarray(features, np.float64)
  weight = np.asarray(weight, np.float64)
  n, d = features.shape
  counts = np.array([np.sum(labels == c) for c in range(k)])
  means = np.stack([features[labels == c].mean(0) for c in range(k)])
  global_mean = means.mean(0) if centering == "classes" else features.mean(0)
  centered = means - global_mean
  sigma_b = centered.T @ centered / k
  eigenvalues, eigenvectors = np.linalg.eigh(sigma_b)
  top = np.argsort(eigenvalues)[::-1][:k - 1]
  pinv = (eigenvectors[:, top] / eigenvalues[top]) @ eigenvectors[:, top].T

  def within(rows):
    dev = features[rows] - means[labels[rows]]
    return dev.T @ dev / max(rows.sum(), 1)

  def etf(gram):
    target = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)
    return np.linalg.norm(gram / np.linalg.norm(gram) - target)

  def cos(rows):
    if len(rows) < 2:
      return np.nan
    vals = [rows[i] @ rows[j] / np.linalg.norm(rows[i]) / np.linalg.norm(rows[j])
            for i in range(len(rows)) for j in range(len(rows)) if i != j]
    return np.mean(vals)

  is_minority = np.isin(np.arange(k), minority)
  sample_minority = is_minority[labels]
  logits = features @ weight.T + (0 if bias is None else bias)
  nearest = np.argmin(((features[:, None, :] - means[None]) ** 2).sum(-1), 1)
  w_norms = np.linalg.norm(weight, axis=1)
  m_norms = np.linalg.norm(centered, axis=1)
  ratio = lambda x: (x[~is_minority].mean() / x[is_minority].mean()
                     if is_minority.any() and (~is_minority).any() else np.nan)
  nc1_group = lambda rows: (np.trace(within(rows) @ pinv) / k if rows.any()
                            else np.nan)
  return dict(
      nc1=np.trace(within(np.ones(n, bool)) @ pinv) / k,
      nc2=etf(weight @ weight.T), nc2_means=etf(centered @ centered.T),
      nc3=np.linalg.norm(weight / np.linalg.norm(weight)
                         - centered / np.linalg.norm(centered)),
      nc4=np.mean(np.argmax(logits, 1) != nearest),
      minority_cos_w=cos(weight[is_minority]),
      minority_cos_means=cos(centered[is_minority]),
      equinorm_w=w_norms.std() / w_norms.mean(),
      equinorm_means=m_norms.std() / m_norms.mean(),
      nc1_majority=nc1_group(~sample_minority),
      nc1_minority=nc1_group(sample_minority),
      norm_ratio_w=ratio(w_norms), norm_ratio_means=ratio(m_norms))


def _close(a, b, tol=1e-10):
  a, b = float(a), float(b)
  if math.isnan(b):
    return math.isnan(a)
  return abs(a - b) <= tol * max(1.0, abs(b))


def test_exact_etf_is_fully_collapsed(x64):
  features, labels, weight, bias = _etf_problem()
  for centering in ("classes", "samples"):
    if centering == "samples":
      continue  # imbalanced counts: sample centering moves μ_G off the ETF centre
    m = analysis.neural_collapse(features, labels, weight, bias, num_classes=5,
                                 minority_classes=(2, 4), centering=centering)
    for name in ("nc1", "nc2", "nc2_means", "nc3", "nc4", "equinorm_w",
                 "equinorm_means"):
      assert abs(float(getattr(m, name))) < 1e-10, (name, float(getattr(m, name)))
    assert _close(m.minority_cos_w, -1 / 4)
    assert _close(m.minority_cos_means, -1 / 4)
    assert _close(m.norm_ratio_w, 1.0)


def test_balanced_etf_collapsed_under_both_centerings(x64):
  features, labels, weight, bias = _etf_problem(counts=(4,) * 5)
  for centering in analysis.CENTERINGS:
    m = analysis.neural_collapse(features, labels, weight, bias, num_classes=5,
                                 centering=centering)
    assert max(abs(float(m.nc1)), abs(float(m.nc2)), abs(float(m.nc2_means)),
               abs(float(m.nc3)), abs(float(m.nc4))) < 1e-10


def test_random_features_are_not_collapsed(x64):
  m = analysis.neural_collapse(*_random_problem(), num_classes=4)
  assert float(m.nc1) > 1e-2 and float(m.nc2) > 1e-2 and float(m.nc3) > 1e-2
  assert float(m.nc2_means) > 1e-2 and float(m.nc4) > 0


def test_invariant_to_scaling_features_and_weights(x64):
  features, labels, weight, bias = _random_problem()
  base = analysis.neural_collapse(features, labels, weight, bias, num_classes=4,
                                  minority_classes=(2, 3))
  a, c = 7.5, 0.03
  scaled = analysis.neural_collapse(a * features, labels, c * weight, a * c * bias,
                                    num_classes=4, minority_classes=(2, 3))
  for name in FIELDS:
    assert _close(getattr(scaled, name), getattr(base, name), 1e-9), name


def test_centerings_agree_when_balanced_and_differ_when_not(x64):
  features, labels, weight, bias = _random_problem(counts=(10, 10, 10, 10))
  balanced = [analysis.neural_collapse(features, labels, weight, bias, num_classes=4,
                                       centering=c) for c in analysis.CENTERINGS]
  for name in FIELDS:
    assert _close(getattr(balanced[0], name), getattr(balanced[1], name), 1e-12), name
  features, labels, weight, bias = _random_problem()
  imbalanced = [analysis.neural_collapse(features, labels, weight, bias,
                                         num_classes=4, centering=c)
                for c in analysis.CENTERINGS]
  for name in ("nc1", "nc2_means", "nc3"):
    assert abs(float(getattr(imbalanced[0], name))
               - float(getattr(imbalanced[1], name))) > 1e-6, name


def test_nc1_never_negative(x64):
  rng = np.random.default_rng(3)
  for trial in range(5):
    k, d = int(rng.integers(2, 6)), int(rng.integers(1, 8))
    labels = np.concatenate([np.arange(k), rng.integers(0, k, 20)])
    features = rng.normal(size=(len(labels), d)) * rng.uniform(1e-6, 1e3)
    for centering in analysis.CENTERINGS:
      m = analysis.neural_collapse(features, labels, rng.normal(size=(k, d)),
                                   num_classes=k, centering=centering)
      assert float(m.nc1) >= 0.0


def test_minority_cosine_etf_and_collapsed(x64):
  _, _, weight, _ = _etf_problem()
  features, labels, _, _ = _random_problem(k=5, d=8, counts=(5,) * 5)
  m = analysis.neural_collapse(features, labels, weight, num_classes=5,
                               minority_classes=(0, 1, 3))
  assert _close(m.minority_cos_w, -1 / 4)
  collapsed = weight.copy()
  collapsed[[1, 3]] = collapsed[0]
  m = analysis.neural_collapse(features, labels, collapsed, num_classes=5,
                               minority_classes=(0, 1, 3))
  assert _close(m.minority_cos_w, 1.0)
  single = analysis.neural_collapse(features, labels, weight, num_classes=5,
                                    minority_classes=(2,))
  assert math.isnan(float(single.minority_cos_w))


@pytest.mark.parametrize("centering", analysis.CENTERINGS)
@pytest.mark.parametrize("minority", [(), (2, 3), (1,)])
def test_every_field_matches_numpy_reference(x64, centering, minority):
  features, labels, weight, bias = _random_problem()
  got = analysis.neural_collapse(features, labels, weight, bias, num_classes=4,
                                 minority_classes=minority, centering=centering)
  want = _numpy_reference(features, labels, weight, bias, 4, minority, centering)
  assert set(want) == set(FIELDS)
  for name in FIELDS:
    assert _close(getattr(got, name), want[name]), (name, float(getattr(got, name)),
                                                     want[name])
  # NC1 splits into its groups, weighted by their sample counts.
  if minority:
    minority_samples = np.isin(labels, minority).sum()
    combined = ((len(labels) - minority_samples) * float(got.nc1_majority)
                + minority_samples * float(got.nc1_minority)) / len(labels)
    assert _close(combined, got.nc1)


@pytest.mark.parametrize("centering", analysis.CENTERINGS)
def test_streaming_accumulator_equals_one_shot(x64, centering):
  features, labels, weight, bias = _random_problem(seed=5)
  order = np.random.default_rng(0).permutation(len(labels))
  features, labels = features[order], labels[order]
  batch = 8
  pad = (-len(labels)) % batch
  padded_h = np.concatenate([features, np.zeros((pad, features.shape[1]))])
  padded_y = np.concatenate([labels, np.zeros(pad, np.int64)])
  mask = np.arange(len(padded_y)) < len(labels)
  batches = [dict(image=padded_h[i:i + batch], label=padded_y[i:i + batch],
                  mask=mask[i:i + batch]) for i in range(0, len(padded_y), batch)]
  streamed = analysis.streaming_neural_collapse(
      lambda h: (h, h @ weight.T + bias), lambda: iter(batches), weight, bias,
      num_classes=4, minority_classes=(2, 3), centering=centering)
  one_shot = analysis.neural_collapse(features, labels, weight, bias, num_classes=4,
                                      minority_classes=(2, 3), centering=centering)
  for name in FIELDS:
    assert _close(getattr(streamed, name), getattr(one_shot, name)), name
  collected = analysis.extract_features(lambda h: (h, h @ weight.T + bias), batches)
  np.testing.assert_array_equal(collected.labels, labels)
  np.testing.assert_allclose(collected.features, features)


def test_bad_inputs_are_rejected():
  features, labels, weight, bias = _random_problem()
  with pytest.raises(ValueError, match="centering"):
    analysis.neural_collapse(features, labels, weight, num_classes=4, centering="x")
  with pytest.raises(ValueError, match="no samples"):
    analysis.neural_collapse(features[labels < 3], labels[labels < 3], weight,
                             num_classes=4)
  with pytest.raises(ValueError, match="weight must have shape"):
    analysis.neural_collapse(features, labels, weight.T, num_classes=4)
  with pytest.raises(ValueError, match="minority_classes"):
    analysis.neural_collapse(features, labels, weight, num_classes=4,
                             minority_classes=(4,))

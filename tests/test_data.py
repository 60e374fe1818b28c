"""jdeq.data: real MNIST / CIFAR-10 from the offline TFDS directory, the other
datasets through ``tfds.testing.mock_data``."""

import dataclasses
import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jdeq import data
from jdeq.data import augment_tf
from jdeq.data import imbalance as imbalance_lib

SUBSET = "train[:2048]"  # decodes in about a second; the pipeline is the same


def _cifar(data_dir, **overrides):
  options = dict(name="cifar10", data_dir=str(data_dir), batch_size=256,
                 augment=False, train_split=SUBSET)
  return data.DataConfig(**{**options, **overrides})


def _take(iterator, count):
  batches = list(itertools.islice(iterator, count))
  iterator.close()
  return batches


def _assert_same(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


# ---- real data ------------------------------------------------------------------------


def test_cifar10_shapes_dtypes_and_normalization(tfds_data_dir):
  cfg = _cifar(tfds_data_dir)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(10, (32, 32, 3), 2048, 10_000)
  epoch = _take(data.train_batches(cfg), 8)  # 2048 / 256: exactly one epoch
  for batch in epoch:
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (256, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (256,) and batch["label"].dtype == np.int32
  images = np.concatenate([b["image"] for b in epoch])
  np.testing.assert_allclose(images.mean((0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(images.std((0, 1, 2)), 1.0, atol=0.05)
  # An epoch visits every example once: the label histogram is the split's.
  labels = np.concatenate([b["label"] for b in epoch])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                data.class_counts(cfg))


def test_mnist_shapes_and_normalization(tfds_data_dir):
  if not (tfds_data_dir / "mnist").is_dir():
    pytest.skip("no mnist in the test data directory")
  cfg = data.DataConfig(name="mnist", data_dir=str(tfds_data_dir), batch_size=512,
                        augment=True, train_split="train[:1024]")
  assert data.dataset_info(cfg) == data.DatasetInfo(10, (28, 28, 1), 1024, 10_000)
  batches = _take(data.train_batches(cfg), 2)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.shape == (1024, 28, 28, 1) and images.dtype == np.float32
  assert labels.min() >= 0 and labels.max() <= 9
  assert abs(images.mean()) < 0.15 and abs(images.std() - 1.0) < 0.15


def test_order_is_determined_by_the_seed(tfds_data_dir):
  first = _take(data.train_batches(_cifar(tfds_data_dir, augment=True)), 3)
  again = _take(data.train_batches(_cifar(tfds_data_dir, augment=True)), 3)
  other = _take(data.train_batches(_cifar(tfds_data_dir, augment=True, seed=1)), 3)
  for a, b in zip(first, again):
    _assert_same(a, b)
  for a, b in zip(first, other):
    assert not np.array_equal(a["label"], b["label"])
  # Epochs are reshuffled.
  epoch0, epoch1 = _take(data.train_batches(_cifar(tfds_data_dir), start_step=0), 9)[::8]
  assert not np.array_equal(epoch0["label"], epoch1["label"])


@pytest.mark.parametrize("start_step", [3, 8, 13])  # mid-epoch, boundary, 2nd epoch
def test_exact_resume(tfds_data_dir, start_step):
  cfg = _cifar(tfds_data_dir, augment=True)
  fresh = _take(data.train_batches(cfg), start_step + 2)
  resumed = _take(data.train_batches(cfg, start_step=start_step), 2)
  for a, b in zip(fresh[start_step:], resumed):
    _assert_same(a, b)


def test_eval_pass_covers_the_test_split_once(tfds_data_dir):
  cfg = _cifar(tfds_data_dir, eval_batch_size=768)  # 10000 = 13 * 768 + 16
  batches = list(data.eval_batches(cfg, split="test"))
  assert len(batches) == 14
  for batch in batches:
    assert batch["image"].shape == (768, 32, 32, 3)
    assert batch["label"].shape == batch["mask"].shape == (768,)
    assert batch["mask"].dtype == np.float32
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10_000 and np.all(mask[:10_000] == 1)
  assert not np.any(batches[-1]["image"][16:])  # padding is zeros
  labels = np.concatenate([b["label"] for b in batches])[:10_000]
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


def test_augmentation_is_a_padded_crop_and_flip(tfds_data_dir):
  plain = _take(data.train_batches(_cifar(tfds_data_dir)), 1)[0]
  augmented = _take(data.train_batches(_cifar(tfds_data_dir, augment=True)), 1)[0]
  np.testing.assert_array_equal(plain["label"], augmented["label"])  # same order
  spec = data.get_spec("cifar10")
  zero_pixel = (0.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  found = []
  for image, target in zip(plain["image"][:24], augmented["image"][:24]):
    matches = []
    for dy, dx, flip in itertools.product(range(-4, 5), range(-4, 5), (False, True)):
      candidate = np.broadcast_to(zero_pixel.astype(np.float32), image.shape).copy()
      rows_to = slice(max(dy, 0), 32 + min(dy, 0))
      rows_from = slice(max(-dy, 0), 32 + min(-dy, 0))
      cols_to = slice(max(dx, 0), 32 + min(dx, 0))
      cols_from = slice(max(-dx, 0), 32 + min(-dx, 0))
      candidate[rows_to, cols_to] = image[rows_from, cols_from]
      if flip:
        candidate = candidate[:, ::-1]
      if np.allclose(candidate, target, atol=1e-5):
        matches.append((dy, dx, flip))
    assert matches, "an augmented image is no padded crop within 4 pixels"
    found.append(matches[0])
  shifts = {(dy, dx) for dy, dx, _ in found}
  assert len(shifts) > 5 and {flip for *_, flip in found} == {False, True}


def test_crop_flip_parameters_stay_in_range():
  params = data.sample_crop_flip(np.random.default_rng(0), 4096, padding=4, flip=True)
  for shift in (params.shift_y, params.shift_x):
    assert shift.min() == -4 and shift.max() == 4
  assert 0.45 < params.flip.mean() < 0.55
  image = np.arange(2 * 5 * 5 * 1, dtype=np.uint8).reshape(2, 5, 5, 1)
  shifted = data.apply_crop_flip(
      image, data.CropFlip(np.array([1, 0]), np.array([-2, 0]), np.array([False, True])))
  np.testing.assert_array_equal(shifted[0, 1:, :3], image[0, :4, 2:])
  assert not shifted[0, 0].any() and not shifted[0, :, 3:].any()
  np.testing.assert_array_equal(shifted[1], image[1, :, ::-1])


def test_imbalanced_subset(tfds_data_dir):
  imbalance = data.Imbalance(majority_classes=3, n_majority=100, ratio=10)
  cfg = _cifar(tfds_data_dir, imbalance=imbalance, batch_size=37)
  expected = np.array([100] * 3 + [10] * 7)
  np.testing.assert_array_equal(data.class_counts(cfg), expected)
  assert data.dataset_info(cfg).num_train == 370
  labels = np.concatenate([b["label"] for b in _take(data.train_batches(cfg), 10)])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), expected)
  # A class seed permutes which classes are the majority; a mapping is accepted too.
  seeded = _cifar(tfds_data_dir, batch_size=37,
                  imbalance={"majority_classes": 3, "n_majority": 100, "ratio": 10,
                             "class_seed": 4})
  majority = data.majority_classes(seeded.imbalance, 10)
  assert sorted(majority) != [0, 1, 2]
  counts = data.class_counts(seeded)
  assert set(np.flatnonzero(counts == 100)) == set(majority)
  with pytest.raises(ValueError, match="class 0 has"):
    next(data.train_batches(_cifar(tfds_data_dir, imbalance=data.Imbalance(
        majority_classes=1, n_majority=1000, ratio=2))))


def test_imbalance_seed_shuffles_examples_but_keeps_the_label_order():
  labels = np.repeat(np.arange(4), 50)
  first = data.Imbalance(majority_classes=2, n_majority=20, ratio=4)
  shuffled = dataclasses.replace(first, seed=3)
  np.testing.assert_array_equal(data.majority_classes(shuffled, 4), [0, 1])
  plain = imbalance_lib.subset_indices(first, labels, 4)
  drawn = imbalance_lib.subset_indices(shuffled, labels, 4)
  np.testing.assert_array_equal(np.bincount(labels[drawn], minlength=4), [20, 20, 5, 5])
  assert not np.array_equal(plain, drawn)
  # The minority classes keep the first n_B of the same shuffle a larger n_B would draw.
  more = dataclasses.replace(shuffled, ratio=2)
  assert set(drawn[labels[drawn] >= 2]) <= set(imbalance_lib.subset_indices(more, labels, 4))


def test_missing_dataset_names_the_directory_and_the_fixes(tmp_path, monkeypatch):
  cfg = data.DataConfig(name="cifar100", data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.dataset_info(cfg)
  message = str(error.value)
  for part in ("cifar100", str(tmp_path), "--data-dir", "TFDS_DATA_DIR"):
    assert part in message
  assert isinstance(error.value, FileNotFoundError)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
  with pytest.raises(data.DatasetNotFoundError, match="from_env"):
    next(data.train_batches(data.DataConfig(name="mnist")))


def test_config_errors():
  with pytest.raises(ValueError, match="unknown option.*batchsize"):
    data.DataConfig(name="cifar10", batchsize=3)
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10"):
    data.DataConfig(name="cifar11")
  with pytest.raises(ValueError, match="batch_size"):
    data.DataConfig(batch_size=0)
  with pytest.raises(ValueError, match="ratio"):
    data.Imbalance(majority_classes=2, n_majority=10, ratio=0.5)
  with pytest.raises(ValueError, match="image_size"):
    next(data.train_batches(data.DataConfig(name="cifar10", image_size=64)))
  with pytest.raises(ValueError, match="imbalance is supported for the in-memory"):
    data.DataConfig(name="imagenette", imbalance=data.Imbalance(
        majority_classes=2, n_majority=10, ratio=2))
  with pytest.raises(ValueError, match="start_step"):
    data.train_batches(data.DataConfig(), start_step=-1)


# ---- datasets that are not available offline: tfds.testing.mock_data -------------------


def _check_mocked(name, num_examples, batch_size=4, steps=3, **overrides):
  """Shapes, dtypes, value ranges, exact resume and eval batches of a mocked set."""
  data.clear_cache()  # mocked splits must not meet real ones in the caches
  try:
    with tfds.testing.mock_data(num_examples=num_examples):
      cfg = data.DataConfig(name=name, batch_size=batch_size, **overrides)
      info = data.dataset_info(cfg)
      height, width, channels = info.image_shape
      batches = _take(data.train_batches(cfg), steps)
      resumed = _take(data.train_batches(cfg, start_step=steps - 1), 1)
      evaluated = list(data.eval_batches(cfg))
  finally:
    data.clear_cache()
  _assert_same(batches[-1], resumed[0])
  for batch in batches:
    assert batch["image"].shape == (batch_size, height, width, channels)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert np.all(np.isfinite(batch["image"]))
  spec = data.get_spec(name)
  low = (0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  high = (1 - np.asarray(spec.mean)) / np.asarray(spec.std)
  images = np.concatenate([b["image"] for b in batches])
  assert np.all(images >= low - 1e-4) and np.all(images <= high + 1e-4)
  return info, batches, evaluated


@pytest.mark.parametrize("name,classes", [("cifar100", 100), ("imagenette", 10),
                                          ("imagenet2012", 1000)])
def test_mocked_classification(name, classes):
  overrides = {} if name == "cifar100" else {"image_size": 48}
  info, batches, evaluated = _check_mocked(name, 24, augment=True, **overrides)
  assert info.num_classes == classes and info.num_train == info.num_test == 24
  if name != "cifar100":
    assert info.image_shape == (48, 48, 3)
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.min() >= 0 and labels.max() < classes
  assert sum(b["mask"].sum() for b in evaluated) == 24
  assert {b["image"].shape for b in evaluated} == {(4,) + info.image_shape}


def test_mocked_imagenet100_subset():
  info, batches, _ = _check_mocked("imagenet100", 300, image_size=32)
  assert info.num_classes == 100
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.min() >= 0 and labels.max() < 100
  # The subset's WordNet ids map onto 0..99 in sorted id order.
  from jdeq.data import source
  spec = data.get_spec("imagenet100")
  table = source.subset_label_table(spec, None)
  names = source.builder("imagenet100", None).info.features["label"].names
  kept = np.flatnonzero(table >= 0)
  assert len(kept) == 100 and set(names[i] for i in kept) == set(data.IMAGENET100_WNIDS)
  np.testing.assert_array_equal(table[kept], np.arange(100))


def test_mocked_cityscapes():
  info, batches, evaluated = _check_mocked("cityscapes", 2, batch_size=1, steps=2,
                                           image_size=(64, 128))
  assert info.num_classes == 19 and info.image_shape == (64, 128, 3)
  for batch in batches:
    assert batch["label"].shape == (1, 64, 128)
    values = set(np.unique(batch["label"]))
    assert values <= set(range(19)) | {255}
  assert evaluated[0]["image"].shape == (1, 1024, 2048, 3)
  assert evaluated[0]["label"].shape == (1, 1024, 2048)


def test_cityscapes_label_ids_map_to_train_ids():
  table = data.specs.cityscapes_label_table()
  assert table[7] == 0 and table[26] == 13 and table[33] == 18
  assert table[0] == table[6] == table[34] == data.IGNORE_LABEL
  assert sorted(data.CITYSCAPES_LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))


@pytest.mark.parametrize("scale_range", [(1.0, 1.0), (0.5, 2.0)])
def test_segmentation_transform_keeps_image_and_mask_aligned(scale_range):
  # Class c occupies columns [16c, 16c + 16) and the image encodes it as 40 c, so any
  # joint transform keeps image == 40 * mask; an image-only flip would break it.
  mask = np.repeat(np.arange(4, dtype=np.uint8), 16)[None, :, None].repeat(32, 0)
  image = np.repeat(mask * 40, 3, axis=-1)
  flips = []
  for seed in range(8):
    out_image, out_mask = augment_tf.segmentation_train(
        tf.constant(image), tf.constant(mask), tf.constant([seed, 0], tf.int64),
        crop_size=(24, 48), scale_range=scale_range, ignore_label=255)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert out_image.shape == (24, 48, 3) and out_mask.shape == (24, 48)
    real = out_mask != 255
    agree = np.isclose(out_image[..., 0], 40.0 * out_mask, atol=0.5)[real]
    assert agree.mean() > (0.999 if scale_range == (1.0, 1.0) else 0.9)
    assert np.all(out_image[~real] == 0)  # padding: zero image, ignored mask
    columns = out_mask[0][real[0]]
    flips.append(bool(columns[0] > columns[-1]))
  assert set(flips) == {False, True}


def test_prefetch_thread_reraises_producer_errors():
  from jdeq.data.prefetch import prefetch_in_thread

  def failing():
    yield 1
    raise RuntimeError("broken source")

  iterator = prefetch_in_thread(failing(), size=2)
  assert next(iterator) == 1
  with pytest.raises(RuntimeError, match="broken source"):
    next(iterator)

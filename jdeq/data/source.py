"""Finding and opening datasets: TFDS data directories and array caches.

A dataset lives in the data directory ``DataConfig.data_dir``, else
``TFDS_DATA_DIR``, else TFDS's default. That directory is either

* a TFDS data directory, read through ``tfds.builder(name, data_dir=...)
  .as_dataset(...)`` (TensorFlow and TensorFlow Datasets are imported on first use,
  here and in the streamed pipeline only); nothing is ever downloaded, so a prepared
  copy of a dataset (an offline data directory, a shared drive) is read exactly like
  one TFDS downloaded; or
* an array cache of the in-memory datasets (:mod:`jdeq.data.array_cache`, written by
  ``python -m jdeq.data.export``), recognised by its ``jdeq_array_cache.json`` and
  read with numpy alone.

A dataset that is not there raises :class:`DatasetNotFoundError` naming the dataset,
the directory searched, and the ways to point at the right one; a TFDS directory
without TensorFlow installed raises :class:`TensorFlowUnavailableError` (one of
them), which names both fixes: installing TensorFlow and TFDS, or exporting an
array cache.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, Optional

import numpy as np

from jdeq.data import array_cache
from jdeq.data.config import DataConfig
from jdeq.data.imbalance import per_class_counts
from jdeq.data.specs import DatasetSpec, get_spec, in_memory_datasets

# TFDS's default data directory (``tfds.core.constants.DATA_DIR``) when TFDS is absent.
_TFDS_DEFAULT_DIR = "~/tensorflow_datasets"


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared in the data directory that was searched."""


class TensorFlowUnavailableError(DatasetNotFoundError):
  """The dataset is in TFDS form (or only TFDS can read it), and TensorFlow or
  TensorFlow Datasets is not installed."""


class DatasetInfo(NamedTuple):
  """What a model and a training loop need to know about a dataset.

  ``num_train`` counts the training examples the pipeline draws from (after
  ``train_split`` and ``imbalance``); ``num_test`` the evaluation split's.
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int


def resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
  """``data_dir``, else ``$TFDS_DATA_DIR``, else None (TFDS's default)."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR") or None


def _searched_dir(data_dir: Optional[str]) -> str:
  if data_dir is not None:
    return data_dir
  try:
    from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
    return os.path.expanduser(constants.DATA_DIR)
  except ImportError:
    return os.path.expanduser(_TFDS_DEFAULT_DIR)


def not_found_error(spec: DatasetSpec, data_dir: Optional[str]) -> DatasetNotFoundError:
  cache = (f" (or a jdeq array cache of it, made with `"
           f"{array_cache.export_hint(spec.name)}`)" if spec.in_memory else "")
  return DatasetNotFoundError(
      f"dataset {spec.name!r} (TFDS {spec.tfds_name!r}) was not found in the data "
      f"directory {_searched_dir(data_dir)!r}. Pass --data-dir (DataConfig.data_dir) "
      f"pointing at a TFDS data directory that holds it{cache}, or set "
      f"TFDS_DATA_DIR; to fetch it, run "
      f"tfds.builder({spec.tfds_name!r}).download_and_prepare() once "
      f"(ImageNet and Cityscapes need TFDS's manual download directory).")


def tensorflow_unavailable_error(spec: DatasetSpec, data_dir: Optional[str],
                                 missing: str) -> TensorFlowUnavailableError:
  """The error for reading ``spec`` from a TFDS directory without ``missing``."""
  install = ("install them: pip install tensorflow-cpu tensorflow-datasets (or "
             "pip install \"jdeq[data]\")")
  if spec.in_memory:
    fix = (f"Either {install}; or use an array cache, read without TensorFlow: "
           f"export it once where TensorFlow is installed with `"
           f"{array_cache.export_hint(spec.name)}` and pass --data-dir CACHE_DIR "
           f"(DataConfig.data_dir, or TFDS_DATA_DIR).")
  else:
    fix = (f"{install[0].upper()}{install[1:]}. ({spec.name!r} is streamed from TFDS; "
           f"an array cache holds only the in-memory datasets {in_memory_datasets()}.)")
  return TensorFlowUnavailableError(
      f"dataset {spec.name!r} cannot be read: the data directory "
      f"{_searched_dir(data_dir)!r} is not a jdeq array cache, and reading it as a "
      f"TFDS data directory needs tensorflow and tensorflow-datasets ({missing} is not "
      f"installed). {fix}")


def tensorflow_modules(spec: DatasetSpec, data_dir: Optional[str]) -> tuple[Any, Any]:
  """``(tensorflow, tensorflow_datasets)``, imported on first use.

  Raises:
    TensorFlowUnavailableError: either is not installed (the message names both
      ways to go on).
    ValueError: ``data_dir`` is an array cache, which TFDS cannot read.
  """
  _reject_array_cache(spec, data_dir)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise tensorflow_unavailable_error(spec, data_dir, "tensorflow") from error
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise tensorflow_unavailable_error(spec, data_dir, "tensorflow-datasets") from error
  return tensorflow, tensorflow_datasets


def _tfds(spec: DatasetSpec, data_dir: Optional[str]):
  return tensorflow_modules(spec, data_dir)[1]


def _reject_array_cache(spec: DatasetSpec, data_dir: Optional[str]) -> None:
  """A TFDS read of an array cache is a streamed dataset pointed at a cache."""
  if array_cache.is_array_cache(data_dir):
    raise ValueError(
        f"dataset {spec.name!r} is read from TFDS, and {data_dir!r} is a jdeq "
        f"array cache, which holds only the in-memory datasets "
        f"{in_memory_datasets()}; pass --data-dir (DataConfig.data_dir) pointing at a "
        f"TFDS data directory that holds {spec.name!r}")


def _cache_manifest(spec: DatasetSpec, data_dir: str) -> dict[str, Any]:
  """The manifest of ``spec`` in the array cache ``data_dir``, or a clear error."""
  if not spec.in_memory:
    _reject_array_cache(spec, data_dir)
  try:
    return array_cache.read_manifest(data_dir, spec)
  except FileNotFoundError as error:
    raise DatasetNotFoundError(
        f"dataset {spec.name!r} is not in the jdeq array cache {data_dir!r} (it holds "
        f"{array_cache.datasets_in(data_dir) or 'nothing'}). Export it with `"
        f"{array_cache.export_hint(spec.name, data_dir)}`, or pass --data-dir "
        f"(DataConfig.data_dir) pointing at a TFDS data directory that holds it."
    ) from error


@functools.lru_cache(maxsize=16)
def builder(name: str, data_dir: Optional[str]):
  """The TFDS builder of registered dataset ``name`` (never downloads)."""
  spec = get_spec(name)
  tfds = _tfds(spec, data_dir)
  try:
    return tfds.builder(spec.tfds_name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise not_found_error(spec, data_dir) from error


def as_dataset(spec: DatasetSpec, data_dir: Optional[str], split: str, *,
               decoders=None, read_config=None, shuffle_files: bool = False):
  """``builder.as_dataset`` (a ``tf.data.Dataset``) that reports a missing dataset
  clearly."""
  try:
    return builder(spec.name, data_dir).as_dataset(
        split=split, decoders=decoders, read_config=read_config,
        shuffle_files=shuffle_files)
  except AssertionError as error:  # TFDS's way of saying "not prepared"
    if "could not find data" in str(error):
      raise not_found_error(spec, data_dir) from error
    raise


def subset_label_table(spec: DatasetSpec, data_dir: Optional[str]) -> np.ndarray:
  """``table[parent_label] = subset_label`` (-1 outside the subset)."""
  label_feature = builder(spec.name, data_dir).info.features[spec.label_key]
  parent_labels = sorted(label_feature.str2int(wnid) for wnid in spec.class_subset)
  table = np.full(label_feature.num_classes, -1, np.int64)
  table[parent_labels] = np.arange(len(parent_labels))
  return table


def num_examples(spec: DatasetSpec, data_dir: Optional[str], split: str) -> int:
  """Examples in ``split`` (a TFDS split string, slices allowed)."""
  return _num_examples(spec.name, data_dir, split)


@functools.lru_cache(maxsize=64)
def _num_examples(name: str, data_dir: Optional[str], split: str) -> int:
  spec = get_spec(name)
  if array_cache.is_array_cache(data_dir):
    _cache_manifest(spec, data_dir)
    return array_cache.num_examples(data_dir, spec, split)
  tfds = _tfds(spec, data_dir)
  info = builder(name, data_dir).info
  recorded = 0
  try:
    recorded = info.splits[split].num_examples
  except (KeyError, ValueError):
    pass  # no split metadata: a mocked or unprepared dataset
  if recorded and spec.class_subset is None:
    return recorded
  if recorded and spec.num_examples and split in spec.num_examples:
    return spec.num_examples[split]
  dataset = as_dataset(spec, data_dir, split,
                       decoders=tfds.decode.PartialDecoding({spec.label_key: True}))
  if spec.class_subset is None:
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
      return cardinality
  # Counting pass over the labels only (small or mocked data).
  table = subset_label_table(spec, data_dir) if spec.class_subset else None
  count = 0
  for batch in dataset.batch(4096).as_numpy_iterator():
    labels = batch[spec.label_key]
    count += len(labels) if table is None else int(np.sum(table[labels] >= 0))
  return count


def load_in_memory(spec: DatasetSpec, data_dir: Optional[str], split: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The whole split decoded once: ``(images uint8 (N,H,W,C), labels int32 (N,))``.

  From an array cache the arrays are read as exported (the same arrays, so the same
  batches); from a TFDS directory the split is decoded. Cached per process, so
  training, evaluation and repeated pipelines decode each split once (CIFAR-10's 60k
  PNGs take a few seconds; see the package docstring).
  """
  return _load_in_memory(spec.name, data_dir, split)


@functools.lru_cache(maxsize=4)
def _load_in_memory(name: str, data_dir: Optional[str], split: str
                    ) -> tuple[np.ndarray, np.ndarray]:
  spec = get_spec(name)
  if array_cache.is_array_cache(data_dir):
    _cache_manifest(spec, data_dir)
    return array_cache.load_split(data_dir, spec, split)
  return decode_split(spec, data_dir, split)


def decode_split(spec: DatasetSpec, data_dir: Optional[str], split: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes ``split`` of a TFDS data directory into ``(uint8 images, int32 labels)``
  (uncached: :func:`load_in_memory` is the cached entry point)."""
  tf, tfds = tensorflow_modules(spec, data_dir)
  dataset = as_dataset(spec, data_dir, split,
                       decoders={spec.image_key: tfds.decode.SkipDecoding()})
  channels = spec.image_shape[-1]

  def decode(example):
    image = tf.io.decode_image(example[spec.image_key], channels=channels,
                               expand_animations=False)
    return image, tf.cast(example[spec.label_key], tf.int32)

  dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True).batch(2048)
  images, labels = [], []
  for image_chunk, label_chunk in dataset.as_numpy_iterator():
    images.append(image_chunk)
    labels.append(label_chunk)
  if not images:
    raise ValueError(f"split {split!r} of dataset {spec.name!r} is empty")
  images, labels = np.concatenate(images), np.concatenate(labels)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def class_counts(cfg: DataConfig) -> np.ndarray:
  """Per-class training example counts of ``cfg`` (for reports), shape (classes,).

  With ``cfg.imbalance`` these are the subset's counts; without, the counts of the
  training split (which reads its labels).
  """
  spec = get_spec(cfg.name)
  if cfg.imbalance is not None:
    return per_class_counts(cfg.imbalance, spec.num_classes)
  if not spec.in_memory:
    raise ValueError(f"class_counts of the full {spec.name!r} split needs a label "
                     "pass over a streamed dataset; it is only provided for "
                     "in-memory datasets")
  _, labels = load_in_memory(spec, resolve_data_dir(cfg.data_dir),
                             cfg.train_split or spec.train_split)
  return np.bincount(labels, minlength=spec.num_classes)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
  """Number of classes, emitted image shape and split sizes of ``cfg``'s data."""
  spec = get_spec(cfg.name)
  data_dir = resolve_data_dir(cfg.data_dir)
  train_split = cfg.train_split or spec.train_split
  if cfg.imbalance is not None:
    num_train = int(sum(class_counts(cfg)))
  else:
    num_train = num_examples(spec, data_dir, train_split)
  num_test = num_examples(spec, data_dir, spec.eval_split)
  return DatasetInfo(num_classes=spec.num_classes,
                     image_shape=output_image_shape(cfg),
                     num_train=num_train, num_test=num_test)


def clear_cache() -> None:
  """Forgets the decoded in-memory splits, split sizes, TFDS builders and the
  arrays read from array caches."""
  _load_in_memory.cache_clear()
  _num_examples.cache_clear()
  builder.cache_clear()
  array_cache.clear_cache()


def output_image_shape(cfg: DataConfig) -> tuple[int, int, int]:
  """``(H, W, C)`` of the training images ``cfg`` produces."""
  spec = get_spec(cfg.name)
  if cfg.image_size is None:
    return spec.image_shape
  size = cfg.image_size
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  if spec.augmentation == "crop" and (height, width) != spec.image_shape[:2]:
    raise ValueError(f"DataConfig: image_size {size!r} is not supported for "
                     f"{spec.name!r}, whose images stay at their stored size "
                     f"{spec.image_shape[:2]}")
  return (height, width, spec.image_shape[-1])

"""Training and evaluation batches: exact-resume order, augmentation, prefetching.

Order. Training batch ``k`` is a pure function of ``(seed, k)``: with ``S`` batches
per epoch (the remainder of each epoch is dropped), batch ``k`` holds positions
``[(k mod S) B, (k mod S + 1) B)`` of epoch ``k // S``'s permutation, which is drawn
from ``(seed, epoch)``, and its augmentation is drawn from ``(seed, k)`` (in-memory
datasets) or ``(seed, example slot k B + i)`` (streamed ones). ``start_step=k``
therefore reproduces batch ``k`` of a fresh iterator exactly. In-memory datasets jump
there without touching the skipped images; streamed ones skip the undecoded records
of the current epoch (they are read and shuffled, never decoded or augmented).

In-memory datasets need only numpy once their arrays are loaded (from an array cache
they need no TensorFlow at all); the streamed path imports TensorFlow, TFDS and
:mod:`jdeq.data.augment_tf` when it first runs.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

import numpy as np

from jdeq.data import augment_numpy, imbalance as imbalance_lib, source
from jdeq.data.config import DataConfig
from jdeq.data.prefetch import prefetch_in_thread
from jdeq.data.specs import IGNORE_LABEL, DatasetSpec, cityscapes_label_table, get_spec

Batch = dict[str, np.ndarray]


def train_batches(cfg: DataConfig, start_step: int = 0) -> Iterator[Batch]:
  """The infinite stream of training batches, starting at batch ``start_step``.

  Args:
    cfg: the pipeline's configuration.
    start_step: index of the first batch; the stream is the tail of the one that
      starts at 0.

  Returns:
    An iterator of ``{"image": float32 (B, H, W, C), "label": int32 (B,)}`` numpy
    batches (``label`` is int32 (B, H, W) with 255 = ignore for segmentation), all
    with ``B = cfg.batch_size``.
  """
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
  spec = get_spec(cfg.name)
  source.output_image_shape(cfg)  # rejects an unsupported image_size now
  if spec.in_memory:
    batches = _in_memory_train(cfg, spec, int(start_step))
    return prefetch_in_thread(batches, cfg.prefetch)
  return _streamed_train(cfg, spec, int(start_step))


def eval_batches(cfg: DataConfig, split: str = "test") -> Iterator[Batch]:
  """One pass over ``split`` in stored order, in batches of ``cfg.eval_batch``.

  ``split="test"`` is the dataset's evaluation split (the validation split for
  ImageNet, Imagenette and Cityscapes); ``"train"`` the training split (without its
  ``imbalance`` subset); any other TFDS split string is passed to TFDS. Images get
  the evaluation view (no augmentation). Every batch has the same shapes and carries
  ``"mask"``, float32 (B,): 1 for real examples, 0 for the zero padding that fills
  the last batch.
  """
  spec = get_spec(cfg.name)
  if split == "train":
    tfds_split = cfg.train_split or spec.train_split
  else:
    tfds_split = spec.resolve_split(split)
  if spec.in_memory:
    return _in_memory_eval(cfg, spec, tfds_split)
  return _streamed_eval(cfg, spec, tfds_split)


def steps_per_epoch(cfg: DataConfig) -> int:
  """Training batches per epoch, ``num_train // batch_size``."""
  return _steps_per_epoch(cfg, source.dataset_info(cfg).num_train)


def _steps_per_epoch(cfg: DataConfig, num_train: int) -> int:
  steps = num_train // cfg.batch_size
  if steps == 0:
    raise ValueError(f"DataConfig: batch_size {cfg.batch_size} exceeds the "
                     f"{num_train} training examples of {cfg.name!r}")
  return steps


def _seed_words(*words: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(list(words)))


# Streams of seeds are told apart by a leading tag.
_ORDER, _AUGMENT = 0, 1


def _in_memory_train(cfg: DataConfig, spec: DatasetSpec,
                     start_step: int) -> Iterator[Batch]:
  data_dir = source.resolve_data_dir(cfg.data_dir)
  images, labels = source.load_in_memory(spec, data_dir,
                                         cfg.train_split or spec.train_split)
  if cfg.imbalance is not None:
    pool = imbalance_lib.subset_indices(cfg.imbalance, labels, spec.num_classes)
  else:
    pool = np.arange(len(labels))
  batch_size = cfg.batch_size
  per_epoch = _steps_per_epoch(cfg, len(pool))

  @functools.lru_cache(maxsize=1)
  def epoch_order(epoch: int) -> np.ndarray:
    return pool[_seed_words(cfg.seed, _ORDER, epoch).permutation(len(pool))]

  step = start_step
  while True:
    epoch, position = divmod(step, per_epoch)
    chosen = epoch_order(epoch)[position * batch_size:(position + 1) * batch_size]
    batch_images = images[chosen]
    if cfg.augment:
      params = augment_numpy.sample_crop_flip(
          _seed_words(cfg.seed, _AUGMENT, step), batch_size, spec.crop_padding,
          spec.flip)
      batch_images = augment_numpy.apply_crop_flip(batch_images, params)
    yield {"image": augment_numpy.normalize(batch_images, spec.mean, spec.std),
           "label": labels[chosen].astype(np.int32)}
    step += 1


def _in_memory_eval(cfg: DataConfig, spec: DatasetSpec,
                    split: str) -> Iterator[Batch]:
  images, labels = source.load_in_memory(
      spec, source.resolve_data_dir(cfg.data_dir), split)
  batch_size = cfg.eval_batch
  for start in range(0, len(labels), batch_size):
    batch = {"image": augment_numpy.normalize(images[start:start + batch_size],
                                              spec.mean, spec.std),
             "label": labels[start:start + batch_size].astype(np.int32)}
    yield _pad(batch, batch_size)


def _pad(batch: Batch, batch_size: int) -> Batch:
  """Zero-pads every array to ``batch_size`` rows and adds the real-example mask."""
  real = len(batch["label"])
  padded = {key: np.concatenate([value, np.zeros((batch_size - real,) + value.shape[1:],
                                                 value.dtype)])
            for key, value in batch.items()}
  padded["mask"] = (np.arange(batch_size) < real).astype(np.float32)
  return padded


# ---- streamed (tf.data) datasets ----------------------------------------------------


def _tensorflow(cfg: DataConfig, spec: DatasetSpec):
  """``(tensorflow, tensorflow_datasets)``, or the error that names the ways on."""
  return source.tensorflow_modules(spec, source.resolve_data_dir(cfg.data_dir))


def _read(cfg: DataConfig, spec: DatasetSpec, split: str, *,
          file_seed: Optional[int] = None):
  """Undecoded examples of ``split`` (shards in a seeded order if ``file_seed``),
  restricted to the spec's class subset, as a ``tf.data.Dataset`` of
  ``(image bytes, label)`` pairs."""
  tf, tfds = _tensorflow(cfg, spec)
  data_dir = source.resolve_data_dir(cfg.data_dir)
  skip_decoding = {spec.image_key: tfds.decode.SkipDecoding()}
  if spec.is_segmentation:
    skip_decoding[spec.label_key] = tfds.decode.SkipDecoding()
  read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False)
  dataset = source.as_dataset(
      spec, data_dir, split, decoders=tfds.decode.PartialDecoding(
          {spec.image_key: True, spec.label_key: True}, decoders=skip_decoding),
      read_config=read_config, shuffle_files=file_seed is not None)
  dataset = dataset.map(lambda example: (example[spec.image_key],
                                         example[spec.label_key]))
  if spec.class_subset is not None:
    table = tf.constant(source.subset_label_table(spec, data_dir))
    dataset = dataset.filter(lambda image, label: tf.gather(table, label) >= 0)
    dataset = dataset.map(lambda image, label: (image, tf.gather(table, label)))
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _decode(tf, spec: DatasetSpec, image_bytes, label):
  """``(uint8 image, int32 label)`` tensors from the stored bytes and label."""
  image = tf.io.decode_image(image_bytes, channels=spec.image_shape[-1],
                             expand_animations=False)
  if spec.is_segmentation:
    label_ids = tf.io.decode_png(label, channels=1)
    table = tf.constant(cityscapes_label_table(), tf.int32)
    label = tf.gather(table, tf.cast(label_ids, tf.int32))
  return image, tf.cast(label, tf.int32)


def _preprocess(cfg: DataConfig, spec: DatasetSpec, *, train: bool):
  """``(slot, image bytes, label) -> (image, label)``: decode, view, normalize."""
  tf, _ = _tensorflow(cfg, spec)
  from jdeq.data import augment_tf  # pylint: disable=g-import-not-at-top  (TF only here)
  height, width, _ = source.output_image_shape(cfg)
  augment = train and cfg.augment

  def preprocess(slot, image_bytes, label):
    image, label = _decode(tf, spec, image_bytes, label)
    seed = tf.stack([tf.constant(cfg.seed, tf.int64), tf.cast(slot, tf.int64)])
    if spec.is_segmentation:
      if augment:
        image, label = augment_tf.segmentation_train(
            image, label, seed, (height, width), spec.scale_range, IGNORE_LABEL)
      else:
        size = (height, width) if train else (spec.eval_image_shape or
                                              tf.shape(image)[:2])
        image, label = augment_tf.segmentation_eval(image, label, size)
    elif augment:
      image = augment_tf.inception_crop(image, seed, (height, width), spec.crop_area)
    else:
      image = augment_tf.center_crop(image, (height, width), spec.eval_crop_fraction)
    return augment_tf.normalize(image, spec.mean, spec.std), label

  return preprocess


def _streamed_train(cfg: DataConfig, spec: DatasetSpec,
                    start_step: int) -> Iterator[Batch]:
  tf, _ = _tensorflow(cfg, spec)
  data_dir = source.resolve_data_dir(cfg.data_dir)
  split = cfg.train_split or spec.train_split
  batch_size = cfg.batch_size
  per_epoch = _steps_per_epoch(cfg, source.num_examples(spec, data_dir, split))
  preprocess = _preprocess(cfg, spec, train=True)
  epoch, position = divmod(start_step, per_epoch)
  while True:
    order_seed = int(np.random.SeedSequence([cfg.seed, _ORDER, epoch])
                     .generate_state(1)[0])
    first_slot = epoch * per_epoch * batch_size
    dataset = _read(cfg, spec, split, file_seed=order_seed)
    dataset = dataset.shuffle(spec.shuffle_buffer, seed=order_seed,
                              reshuffle_each_iteration=False)
    dataset = dataset.take(per_epoch * batch_size).enumerate(first_slot)
    dataset = dataset.skip(position * batch_size)
    dataset = dataset.map(lambda slot, example: preprocess(slot, *example),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(
        max(cfg.prefetch, 1))
    produced = 0
    for image, label in dataset.as_numpy_iterator():
      produced += 1
      yield {"image": image, "label": label}
    if produced != per_epoch - position:
      raise ValueError(
          f"epoch {epoch} of {spec.name!r} ({split}) produced {position + produced} "
          f"batches, but its recorded size promises {per_epoch}; the prepared data "
          "does not match its metadata")
    epoch, position = epoch + 1, 0


def _streamed_eval(cfg: DataConfig, spec: DatasetSpec, split: str) -> Iterator[Batch]:
  tf, _ = _tensorflow(cfg, spec)
  preprocess = _preprocess(cfg, spec, train=False)
  batch_size = cfg.eval_batch
  dataset = _read(cfg, spec, split).enumerate()
  dataset = dataset.map(lambda slot, example: preprocess(slot, *example),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size).prefetch(max(cfg.prefetch, 1))
  for image, label in dataset.as_numpy_iterator():
    yield _pad({"image": image, "label": label}, batch_size)

"""Per-example TensorFlow preprocessing of the streamed datasets (ImageNet-style and
segmentation), with stateless random ops so each draw is a function of its seed.

Every function takes ``seed``, an int64 tensor of shape (2,), and uses it (split
into independent sub-seeds) for all of its draws; the pipeline derives it from
``(DataConfig.seed, global example slot)``, which makes augmentation reproducible
and independent of where an iterator started.

This module is TensorFlow code through and through: :mod:`jdeq.data.pipeline`
imports it only when a streamed dataset is first read, so the in-memory datasets
(and everything above :mod:`jdeq.data`) run without TensorFlow installed.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> tf.Tensor:
  """Pixels in [0, 255] -> float32 ``(x / 255 - mean) / std`` per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_flip(seed: tf.Tensor, *images: tf.Tensor) -> tuple[tf.Tensor, ...]:
  """Mirrors all ``images`` (H, W, C) left-right together with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tuple(tf.cond(flip, lambda x=x: tf.reverse(x, [1]), lambda x=x: x)
               for x in images)


def inception_crop(image: tf.Tensor, seed: tf.Tensor, size: Sequence[int],
                   area_range: Sequence[float]) -> tf.Tensor:
  """Random-resized crop and flip of a uint8 image (H, W, C) -> float32 ``size``.

  The crop covers a uniformly drawn fraction ``area_range`` of the image with an
  aspect ratio in [3/4, 4/3] (the whole image if no such box is found in 10 tries),
  resized bilinearly to ``size = (height, width)``, then flipped with probability 1/2.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=tuple(area_range), max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop = tf.image.resize(crop, size, method="bilinear", antialias=False)
  (crop,) = random_flip(flip_seed, crop)
  return crop


def center_crop(image: tf.Tensor, size: Sequence[int],
                crop_fraction: float) -> tf.Tensor:
  """Evaluation view: resize the shorter side to ``size / crop_fraction``, crop
  the central ``size = (height, width)``; returns float32 pixels in [0, 255]."""
  height, width = size
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = tf.cast(max(height, width), tf.float32) / crop_fraction
  scale = target / tf.reduce_min(shape)
  resized_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32),
                             [height, width])
  image = tf.image.resize(image, resized_shape, method="bilinear", antialias=True)
  top = (resized_shape[0] - height) // 2
  left = (resized_shape[1] - width) // 2
  return image[top:top + height, left:left + width]


def segmentation_train(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
                       crop_size: Sequence[int], scale_range: Sequence[float],
                       ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Joint random scale, crop and flip of an image (H, W, 3) and its mask (H, W, 1).

  The image is rescaled bilinearly and the mask by nearest neighbour, by one factor
  drawn uniformly from ``scale_range``; both are padded at the bottom/right to at
  least ``crop_size`` (image with 0, mask with ``ignore_label``), cropped at the same
  random offset and flipped together.

  Returns:
    float32 image pixels in [0, 255] of shape ``crop_size + (3,)`` and the int32
    mask of shape ``crop_size``.
  """
  scale_seed, top_seed, left_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  crop_height, crop_width = crop_size
  scale = tf.random.stateless_uniform([], scale_seed, scale_range[0], scale_range[1])
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scaled_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
  image = tf.image.resize(image, scaled_shape, method="bilinear")
  mask = tf.image.resize(mask, scaled_shape, method="nearest")
  mask = tf.cast(mask, tf.int32)
  pad_height = tf.maximum(crop_height - scaled_shape[0], 0)
  pad_width = tf.maximum(crop_width - scaled_shape[1], 0)
  paddings = [[0, pad_height], [0, pad_width], [0, 0]]
  image = tf.pad(image, paddings)
  mask = tf.pad(mask, paddings, constant_values=ignore_label)
  padded_shape = tf.shape(mask)[:2]
  top = tf.random.stateless_uniform([], top_seed, 0, padded_shape[0] - crop_height + 1,
                                    dtype=tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0,
                                     padded_shape[1] - crop_width + 1, dtype=tf.int32)
  image = image[top:top + crop_height, left:left + crop_width]
  mask = mask[top:top + crop_height, left:left + crop_width]
  image, mask = random_flip(flip_seed, image, mask)
  image = tf.ensure_shape(image, [crop_height, crop_width, None])
  return image, tf.ensure_shape(mask[..., 0], [crop_height, crop_width])


def segmentation_eval(image: tf.Tensor, mask: tf.Tensor, size: Sequence[int]
                      ) -> tuple[tf.Tensor, tf.Tensor]:
  """Resizes image (bilinear) and mask (nearest) to ``size``; float32, int32."""
  image = tf.image.resize(image, size, method="bilinear")
  mask = tf.image.resize(mask, size, method="nearest")
  return image, tf.cast(mask[..., 0], tf.int32)

"""Vectorized numpy augmentation of uint8 image batches (the in-memory datasets).

Cropping, flipping and normalizing a batch of uint8 images is a few vectorized numpy
passes, much cheaper than decoding the images every step in a tf.data pipeline
(figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class CropFlip(NamedTuple):
  """Per-image parameters of a padded random crop.

  Attributes:
    shift_y: (B,) int, vertical shift of the content in pixels, in [-p, p].
    shift_x: (B,) int, horizontal shift, in [-p, p] (applied before the flip).
    flip: (B,) bool, mirror the crop left-right.
  """
  shift_y: np.ndarray
  shift_x: np.ndarray
  flip: np.ndarray


def sample_crop_flip(rng: np.random.Generator, batch_size: int, padding: int,
                     flip: bool) -> CropFlip:
  """Uniform shifts in ``[-padding, padding]`` and, if ``flip``, fair coin flips."""
  shift_y = rng.integers(-padding, padding + 1, size=batch_size)
  shift_x = rng.integers(-padding, padding + 1, size=batch_size)
  flips = rng.random(batch_size) < 0.5 if flip else np.zeros(batch_size, bool)
  return CropFlip(shift_y, shift_x, flips)


def apply_crop_flip(images: np.ndarray, params: CropFlip) -> np.ndarray:
  """Shifts each image (B, H, W, C) with zero fill, then mirrors the flipped ones.

  Output pixel ``(i, j)`` of image ``b`` is input pixel
  ``(i - shift_y[b], j' - shift_x[b])`` with ``j' = W - 1 - j`` if ``flip[b]`` else
  ``j``, and zero where that falls outside the image: exactly a crop of the image
  zero-padded by ``p >= |shift|`` at offset ``(p - shift_y, p - shift_x)``, mirrored.
  The overlapping block is copied per image rather than gathered with one fancy index
  over the batch, whose index arithmetic dominates for small images.
  """
  batch, height, width, _ = images.shape
  out = np.zeros_like(images)
  for b, (dy, dx) in enumerate(zip(params.shift_y.tolist(), params.shift_x.tolist())):
    out[b, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = (
        images[b, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)])
  out[params.flip] = out[params.flip, :, ::-1]
  return out


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
  scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
  offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32))
  return images.astype(np.float32) * scale + offset.astype(np.float32)

"""Configuration of an input pipeline: which dataset, where, how it is batched."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from jdeq import config, require, require_positive
from jdeq.data.specs import get_spec, list_datasets

ImageSize = Union[int, tuple[int, int]]


@config
class Imbalance:
  """An imbalanced training subset for the neural-collapse studies.

  ``majority_classes = K_A`` classes keep ``n_majority = n_A`` examples each; the other
  ``K_B = num_classes - K_A`` (minority) classes keep ``n_B = n_A // ratio`` each.

  The protocol of Fang et al. (PNAS 2021), the field's standard: by default labels
  ``0 … K_A−1`` are the majority classes. ``seed`` fixes which examples a class keeps:
  with ``seed=None`` its first examples in the split's stored order, with an integer
  the first ``n`` of a ``numpy.random.default_rng([seed, 1])`` shuffle of the class's
  examples. ``class_seed`` (an integer) instead permutes the class order with
  ``numpy.random.default_rng(class_seed)``, the first ``K_A`` classes of the
  permutation becoming the majority. Either way the subset is fixed by the config.

  Attributes:
    majority_classes: ``K_A``, 1 <= K_A <= num_classes.
    n_majority: ``n_A``, examples per majority class.
    ratio: ``R >= 1``; minority classes keep ``n_A // R`` examples (at least 1).
    seed: ``None`` (first examples) or the seed of the per-class example shuffle.
    class_seed: ``None`` (majority = the first ``K_A`` labels) or the seed of the
      class permutation.
  """
  majority_classes: int
  n_majority: int
  ratio: float = 1.0
  seed: Optional[int] = None
  class_seed: Optional[int] = None

  def __post_init__(self):
    require_positive(self, majority_classes=self.majority_classes,
                     n_majority=self.n_majority)
    require(self.ratio >= 1, self, f"ratio must be >= 1, got {self.ratio!r}")
    require(self.n_majority // self.ratio >= 1, self,
            f"n_majority // ratio = {self.n_majority} // {self.ratio} leaves the "
            "minority classes empty")

  @property
  def n_minority(self) -> int:
    """``n_B = n_A // R``."""
    return int(self.n_majority // self.ratio)


@config
class DataConfig:
  """One input pipeline (see :func:`jdeq.data.train_batches`).

  Attributes:
    name: a registered dataset (``jdeq.data.list_datasets()``).
    data_dir: TFDS data directory, or an array cache of the in-memory datasets
      (written by ``python -m jdeq.data.export``, read without TensorFlow; told
      apart by its ``jdeq_array_cache.json``); None uses the ``TFDS_DATA_DIR``
      environment variable, else TFDS's default directory.
    batch_size: training batch size (every training batch has exactly this size).
    augment: the dataset's training augmentation policy (False: none, as MDEQ-Tiny).
    seed: fixes the per-epoch example order and every augmentation draw.
    eval_batch_size: evaluation batch size (None: ``batch_size``).
    imbalance: an :class:`Imbalance` subset of the training split (a mapping of its
      fields is accepted too), or None for the full split. In-memory datasets
      (MNIST, CIFAR) only: choosing the subset needs every training label.
    train_split: TFDS split string of the training data (e.g. ``"train[:10%]"``);
      None uses the dataset's training split.
    image_size: output size of ImageNet-style images (train crop and eval center
      crop) and of the segmentation training crop (segmentation is evaluated at
      the spec's ``eval_image_shape``), an int (square) or ``(height, width)``;
      None uses the dataset's size. CIFAR and MNIST keep their stored size.
    prefetch: batches prepared ahead of the consumer (0 disables the prefetch
      thread of in-memory datasets).
  """
  name: str = "cifar10"
  data_dir: Optional[str] = None
  batch_size: int = 128
  augment: bool = True
  seed: int = 0
  eval_batch_size: Optional[int] = None
  imbalance: Optional[Imbalance] = None
  train_split: Optional[str] = None
  image_size: Optional[ImageSize] = None
  prefetch: int = 2

  def __post_init__(self):
    names = list_datasets()
    require(self.name in names, self,
            f"unknown dataset {self.name!r}; valid datasets: {names}")
    require_positive(self, batch_size=self.batch_size)
    if self.eval_batch_size is not None:
      require_positive(self, eval_batch_size=self.eval_batch_size)
    require(self.prefetch >= 0, self, f"prefetch must be >= 0, got {self.prefetch}")
    if isinstance(self.imbalance, Mapping):
      object.__setattr__(self, "imbalance", Imbalance(**self.imbalance))
    require(self.imbalance is None or isinstance(self.imbalance, Imbalance), self,
            f"imbalance must be a jdeq.data.Imbalance or None, got {self.imbalance!r}")
    in_memory = [name for name in names if get_spec(name).in_memory]
    require(self.imbalance is None or self.name in in_memory, self,
            f"imbalance is supported for the in-memory datasets {in_memory}, not "
            f"for the streamed {self.name!r}")
    if isinstance(self.image_size, list):  # keeps the config hashable
      object.__setattr__(self, "image_size", tuple(self.image_size))
    if self.image_size is not None:
      size = _as_hw(self.image_size)
      require(all(isinstance(s, int) and s > 0 for s in size), self,
              f"image_size must be a positive int or (height, width), got "
              f"{self.image_size!r}")

  @property
  def eval_batch(self) -> int:
    """The evaluation batch size."""
    return self.batch_size if self.eval_batch_size is None else self.eval_batch_size


def _as_hw(size: Any) -> tuple:
  if isinstance(size, int):
    return (size, size)
  return tuple(size) if isinstance(size, tuple) and len(size) == 2 else (None,)

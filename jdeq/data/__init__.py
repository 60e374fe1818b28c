"""Input pipelines over TensorFlow Datasets (TFDS).

Usage::

  from jdeq import data
  cfg = data.DataConfig(name="cifar10", batch_size=128, augment=True, seed=0)
  for batch in data.train_batches(cfg, start_step=0):  # infinite
    ...  # {"image": float32 (B, H, W, C), "label": int32 (B,)}
  for batch in data.eval_batches(cfg, split="test"):   # one pass, "mask" marks padding
    ...
  data.dataset_info(cfg)  # DatasetInfo(num_classes, image_shape, num_train, num_test)

Design. TFDS's random-access data sources (``tfds.data_source``) need the
ArrayRecord file format, while TFDS prepares datasets as TFRecord files by default
(the offline copies included), which only stream. So every dataset is read with
``builder.as_dataset`` and prepared in one of two ways, chosen by its
:class:`DatasetSpec`:

* In memory (MNIST, CIFAR-10/100): the split is decoded once per process into a
  uint8 array and batches are gathered, augmented and normalized with numpy in a
  background thread. Random access makes exact resume free (batch ``k`` is computed
  directly, nothing is skipped), and it is much cheaper than decoding images every
  step (figures in ``docs/benchmarks.md``). The arrays can instead come from an
  array cache (``python -m jdeq.data.export``, :mod:`jdeq.data.array_cache`): the
  same arrays, the same batches, and no TensorFlow needed.
* Streamed (Imagenette, ImageNet-2012, ImageNet-100, Cityscapes): a tf.data pipeline
  per epoch reads the shards in a seeded order through a seeded shuffle buffer,
  decodes and augments in a deterministic parallel map with stateless random ops,
  and prefetches. Resuming mid-epoch skips the undecoded records.

In both, training batch ``k`` depends only on ``(seed, k)``; see
:mod:`jdeq.data.pipeline`. This package knows nothing of models or Flax.
"""

from jdeq.data.array_cache import ArrayCacheError, is_array_cache
from jdeq.data.augment_numpy import CropFlip, apply_crop_flip, sample_crop_flip
from jdeq.data.config import DataConfig, Imbalance
from jdeq.data.imbalance import majority_classes, per_class_counts
from jdeq.data.pipeline import eval_batches, steps_per_epoch, train_batches
from jdeq.data.source import (DatasetInfo, DatasetNotFoundError,
                              TensorFlowUnavailableError, class_counts, clear_cache,
                              dataset_info, resolve_data_dir)
from jdeq.data.specs import (CITYSCAPES_LABEL_ID_TO_TRAIN_ID, IGNORE_LABEL,
                             IMAGENET100_WNIDS, DatasetSpec, get_spec, list_datasets,
                             register)
from jdeq.data.text import (TextDataConfig, TextDataNotFoundError, TextInfo, Vocabulary,
                            build_vocabulary, clear_text_cache, list_text_datasets,
                            lm_eval_batches, lm_train_batches, stream_eval_batches,
                            stream_train_batches, text_info, token_ids, vocabulary)

__all__ = (
    "ArrayCacheError", "CITYSCAPES_LABEL_ID_TO_TRAIN_ID", "CropFlip", "DataConfig",
    "DatasetInfo", "TensorFlowUnavailableError", "is_array_cache",
    "DatasetNotFoundError", "DatasetSpec", "IGNORE_LABEL", "IMAGENET100_WNIDS",
    "Imbalance", "apply_crop_flip", "class_counts", "clear_cache", "dataset_info", "eval_batches",
    "get_spec", "list_datasets", "majority_classes", "per_class_counts", "register",
    "resolve_data_dir", "sample_crop_flip", "steps_per_epoch", "train_batches",
    "TextDataConfig", "TextDataNotFoundError", "TextInfo", "Vocabulary",
    "build_vocabulary", "clear_text_cache", "list_text_datasets", "lm_eval_batches",
    "lm_train_batches", "stream_eval_batches", "stream_train_batches", "text_info",
    "token_ids", "vocabulary",
)

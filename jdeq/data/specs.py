"""The registry of datasets: where TFDS keeps them and how each one is prepared.

A :class:`DatasetSpec` states everything the pipelines need to know about a dataset:
its TFDS name and splits, feature keys, output image size, normalization statistics,
number of classes and augmentation policy. The pipelines contain no per-dataset
branches beyond what a spec says.

ImageNet-100 is the class subset of Tian, Krishnan & Isola, "Contrastive Multiview
Coding" (CMC, 2019): the 100 WordNet ids below, as published with CMC
(``imagenet100.txt``). Its labels are renumbered 0..99 in the sorted order of the
WordNet ids, which is also the order of their ImageNet-2012 label indices (TFDS
numbers ImageNet classes by sorted WordNet id). The split sizes used to lay out its
epochs are the commonly reported ones for this subset (126,689 train / 5,000
validation images); a mismatch with the data is reported as an error, not hidden.

Cityscapes uses TFDS's ``cityscapes/semantic_segmentation`` configuration, whose
``segmentation_label`` holds the ``gtFine_labelIds`` ids 0..33. They are mapped to
the 19 evaluation ("train id") classes of the Cityscapes benchmark by
:data:`CITYSCAPES_LABEL_ID_TO_TRAIN_ID`; every other id becomes the ignore label 255.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

IGNORE_LABEL = 255

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Cityscapes label id -> train id: road, sidewalk, building, wall, fence, pole,
# traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck,
# bus, train, motorcycle, bicycle.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

IMAGENET100_WNIDS = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
    "n02091831", "n04517823", "n04589890", "n03062245", "n01773797",
    "n01735189", "n07831146", "n07753275", "n03085013", "n04485082",
    "n02105505", "n01983481", "n02788148", "n03530642", "n04435653",
    "n02086910", "n02859443", "n13040303", "n03594734", "n02085620",
    "n02099849", "n01558993", "n04493381", "n02109047", "n04111531",
    "n02877765", "n04429376", "n02009229", "n01978455", "n02106550",
    "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838",
    "n04099969", "n04592741", "n03891251", "n02701002", "n03379051",
    "n02259212", "n07715103", "n03947888", "n04026417", "n02326432",
    "n03637318", "n01980166", "n02113799", "n02086240", "n03903868",
    "n02483362", "n04127249", "n02089973", "n03017168", "n02093428",
    "n02804414", "n02396427", "n04418357", "n02172182", "n01729322",
    "n02113978", "n03787032", "n02089867", "n02119022", "n03777754",
    "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542",
    "n02018207", "n04067472", "n03930630", "n03584829", "n02123045",
    "n04229816", "n02100583", "n03642806", "n04336792", "n03259280",
    "n02116738", "n02108089", "n03424325", "n01855672", "n02090622",
)

AUGMENTATIONS = ("crop", "inception_crop", "segmentation")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How one dataset is read and prepared.

  Attributes:
    name: the registry name (``DataConfig.name``).
    tfds_name: TFDS name, with its configuration (``"imagenette/160px-v2"``).
    train_split: TFDS split for training.
    eval_split: TFDS split that ``split="test"`` denotes (the validation split for
      datasets whose test labels are not public).
    num_classes: classes of the labels the pipeline emits.
    image_shape: ``(H, W, C)`` of the emitted images (the crop size for
      ImageNet-style data, the training crop for segmentation).
    mean: per-channel mean of the pixel values scaled to [0, 1].
    std: per-channel standard deviation of the same.
    augmentation: the training policy. ``"crop"``: pad ``crop_padding`` zero
      pixels on each side, crop back at a uniformly random offset (and flip
      horizontally with probability 1/2 if ``flip``); ``"inception_crop"``: random
      resized crop (area in ``crop_area``, aspect ratio in [3/4, 4/3]) and flip;
      ``"segmentation"``: random scale in ``scale_range``, random crop, flip, the
      same transform applied to the image and its label mask.
    in_memory: decode the whole split once into a uint8 array (small datasets).
    image_key: TFDS feature holding the image.
    label_key: TFDS feature holding the label (a mask for segmentation).
    crop_padding: zero padding of the ``"crop"`` policy, pixels.
    flip: random horizontal flips in training.
    crop_area: area fraction range of ``"inception_crop"``.
    eval_crop_fraction: ImageNet-style evaluation resizes the shorter side to
      ``crop / eval_crop_fraction`` and takes the central crop.
    scale_range: random scaling range of ``"segmentation"``.
    eval_image_shape: ``(H, W)`` at which segmentation is evaluated (None: the
      stored resolution).
    class_subset: WordNet ids of a class subset (ImageNet-100), else None.
    num_examples: ``{split: count}`` for subsets whose size TFDS does not record.
    shuffle_buffer: examples in the (seeded) shuffle buffer of streamed datasets;
      each epoch also reads the TFDS shards in a seeded order.
  """
  name: str
  tfds_name: str
  train_split: str
  eval_split: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str
  in_memory: bool = False
  image_key: str = "image"
  label_key: str = "label"
  crop_padding: int = 4
  flip: bool = True
  crop_area: tuple[float, float] = (0.08, 1.0)
  eval_crop_fraction: float = 0.875
  scale_range: tuple[float, float] = (0.5, 2.0)
  eval_image_shape: Optional[tuple[int, int]] = None
  class_subset: Optional[tuple[str, ...]] = None
  num_examples: Optional[dict] = None
  shuffle_buffer: int = 10_000

  def __post_init__(self):
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f"DatasetSpec {self.name}: augmentation must be one of "
                       f"{list(AUGMENTATIONS)}, got {self.augmentation!r}")
    if not len(self.mean) == len(self.std) == self.image_shape[-1]:
      raise ValueError(f"DatasetSpec {self.name}: mean/std need one entry per "
                       f"channel ({self.image_shape[-1]})")

  @property
  def is_segmentation(self) -> bool:
    return self.augmentation == "segmentation"

  def resolve_split(self, split: str) -> str:
    """``"train"`` and ``"test"`` name the spec's splits; others pass through."""
    return {"train": self.train_split, "test": self.eval_split}.get(split, split)


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
  """Adds ``spec`` to the registry (a new name only)."""
  if spec.name in _REGISTRY:
    raise ValueError(f"dataset {spec.name!r} is already registered")
  _REGISTRY[spec.name] = spec
  return spec


def list_datasets() -> list[str]:
  """Names accepted by ``DataConfig.name``."""
  return sorted(_REGISTRY)


def in_memory_datasets() -> list[str]:
  """Names of the datasets decoded into memory (the ones an array cache can hold)."""
  return [name for name in list_datasets() if _REGISTRY[name].in_memory]


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` registered as ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {list_datasets()}")
  return _REGISTRY[name]


def cityscapes_label_table() -> np.ndarray:
  """``table[label_id] = train_id`` for ids 0..255 (255 = ignore)."""
  table = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id in CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


# MNIST digits are not mirror-symmetric: its crop policy does not flip.
register(DatasetSpec(
    name="mnist", tfds_name="mnist", train_split="train", eval_split="test",
    num_classes=10, image_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,),
    augmentation="crop", crop_padding=2, flip=False, in_memory=True))
# True per-pixel statistics of the training split. (MDEQ's reference code divides by
# (0.2023, 0.1994, 0.2010), a widely copied underestimate of the standard deviation.)
register(DatasetSpec(
    name="cifar10", tfds_name="cifar10", train_split="train", eval_split="test",
    num_classes=10, image_shape=(32, 32, 3), mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616), augmentation="crop", in_memory=True))
register(DatasetSpec(
    name="cifar100", tfds_name="cifar100", train_split="train", eval_split="test",
    num_classes=100, image_shape=(32, 32, 3), mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762), augmentation="crop", in_memory=True))
register(DatasetSpec(
    name="imagenette", tfds_name="imagenette/160px-v2", train_split="train",
    eval_split="validation", num_classes=10, image_shape=(128, 128, 3),
    mean=IMAGENET_MEAN, std=IMAGENET_STD, augmentation="inception_crop",
    crop_area=(0.35, 1.0)))
register(DatasetSpec(
    name="imagenet2012", tfds_name="imagenet2012", train_split="train",
    eval_split="validation", num_classes=1000, image_shape=(224, 224, 3),
    mean=IMAGENET_MEAN, std=IMAGENET_STD, augmentation="inception_crop"))
register(DatasetSpec(
    name="imagenet100", tfds_name="imagenet2012", train_split="train",
    eval_split="validation", num_classes=100, image_shape=(224, 224, 3),
    mean=IMAGENET_MEAN, std=IMAGENET_STD, augmentation="inception_crop",
    class_subset=IMAGENET100_WNIDS,
    num_examples={"train": 126_689, "validation": 5_000}))
# MDEQ trains Cityscapes on 512x1024 crops of the 1024x2048 frames and evaluates
# on whole frames.
register(DatasetSpec(
    name="cityscapes", tfds_name="cityscapes/semantic_segmentation",
    train_split="train", eval_split="validation", num_classes=19,
    image_shape=(512, 1024, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD,
    augmentation="segmentation", image_key="image_left",
    label_key="segmentation_label", eval_image_shape=(1024, 2048),
    shuffle_buffer=256))  # ~2.5 MB of PNG per frame

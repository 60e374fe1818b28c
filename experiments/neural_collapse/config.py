"""The study's grid of data settings and its two scales (the paper's and this CPU's).

A *setting* is a dataset with a training subset: balanced, or ``K_A`` majority
classes of ``n_A`` images and ``K_B = K − K_A`` minority classes of ``n_B = n_A / R``
(Fang et al.'s protocol: labels ``0…K_A−1`` are the majority, the test set stays
full and balanced). A *scale* fixes the encoder, ``n_A`` and the optimization:

* ``paper``: the paper's grid as stated (papers.md §7): ResNet-18 encoder,
  ``n_A = 5000`` (CIFAR-10) / ``500`` (CIFAR-100, all its images per class), SGD with
  momentum 0.9, weight decay 5e-4, lr 1e-4, 100 epochs, batch 128. Meant for a GPU.
* ``cpu``: stated plainly smaller so that training reaches the terminal phase
  (≈100% train accuracy, where neural collapse is defined) in minutes on a CPU: a
  small ResNet encoder, ``n_A = 250`` with ``R`` kept (CIFAR-100: 100), and a larger
  learning rate with a cosine decay (at lr 1e-4 these few epochs would not fit).
  About 600 SGD steps of 128 images per arm in both CIFAR-10 settings (32 epochs of
  the 2,500 balanced images, 80 of the 925 of ``K_A = 3, R = 10``): with ``n_A = 500``
  the explicit arm reached 96% train accuracy in 16 epochs (624 steps) and the
  DEQ arm, about twice as slow a step, could not have trained longer within the
  budget.

Setting names: ``cifar10_balanced``, ``cifar10_ka3_r10`` (``K_A = 3``, ``R = 10``), …;
CIFAR-100 scales ``K_A`` by 10 (``cifar100_ka30_r10``, …; our choice: the paper's
CIFAR-100 split is not known here).
"""

from __future__ import annotations

from typing import Optional

import jdeq

DATASETS = {"cifar10": 10, "cifar100": 100}
MAJORITY_SPLITS = ((3, 7), (5, 5), (7, 3))  # (K_A, K_B) on CIFAR-10
RATIOS = (10, 50, 100)
ARMS = ("explicit", "deq")


@jdeq.config
class Setting:
  """A dataset and its training subset.

  Attributes:
    dataset: ``"cifar10"`` or ``"cifar100"``.
    majority_classes: ``K_A``, or None for balanced data.
    ratio: ``R = n_A / n_B`` (1 when balanced).
  """
  dataset: str
  majority_classes: Optional[int] = None
  ratio: int = 1

  def __post_init__(self) -> None:
    if self.dataset not in DATASETS:
      raise ValueError(f"Setting: dataset must be one of {list(DATASETS)}, got "
                       f"{self.dataset!r}")
    k = DATASETS[self.dataset]
    if self.majority_classes is None:
      if self.ratio != 1:
        raise ValueError("Setting: a balanced setting has ratio 1")
    elif not (0 < self.majority_classes < k and self.ratio >= 1):
      raise ValueError(f"Setting: need 0 < K_A < {k} and R >= 1, got K_A="
                       f"{self.majority_classes}, R={self.ratio}")

  @property
  def num_classes(self) -> int:
    return DATASETS[self.dataset]

  @property
  def balanced(self) -> bool:
    return self.majority_classes is None

  @property
  def minority_classes(self) -> tuple[int, ...]:
    """Labels ``K_A…K−1`` (empty when balanced)."""
    if self.balanced:
      return ()
    return tuple(range(self.majority_classes, self.num_classes))

  @property
  def name(self) -> str:
    if self.balanced:
      return f"{self.dataset}_balanced"
    return f"{self.dataset}_ka{self.majority_classes}_r{self.ratio}"


def _grid() -> dict[str, Setting]:
  settings = []
  for dataset, k in DATASETS.items():
    settings.append(Setting(dataset))
    for majority, _ in MAJORITY_SPLITS:
      for ratio in RATIOS:
        settings.append(Setting(dataset, majority * k // 10, ratio))
  return {setting.name: setting for setting in settings}


GRID = _grid()


@jdeq.config
class Scale:
  """Model, subset size and optimization of one scale of the study.

  Attributes:
    name: ``"paper"`` or ``"cpu"``.
    model: registered model configuration per arm and class count, a format string
      with ``{arm}`` and ``{classes}``.
    n_majority: ``n_A`` per dataset (None: the full balanced split when balanced).
    epochs: training epochs per setting kind (``"balanced"``, ``"imbalanced"``).
    lr, momentum, weight_decay, schedule, warmup_steps: SGD settings.
    batch_size: training batch size.
    eval_points: NC measurements over training (besides the one at step 0).
    eval_batch_size: batch size of the feature passes.
    test_probe_per_class: measurements during training use the first this many
      test images of each class (a balanced part of the test set); the final one
      uses the full test set. None: the full test set every time.
  """
  name: str
  model: str
  n_majority: dict
  epochs: dict
  lr: float
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "constant"
  warmup_steps: int = 0
  batch_size: int = 128
  eval_points: int = 10
  eval_batch_size: int = 500
  test_probe_per_class: Optional[int] = None

  def model_name(self, arm: str, num_classes: int) -> str:
    if arm not in ARMS:
      raise ValueError(f"unknown arm {arm!r}; valid arms: {list(ARMS)}")
    return self.model.format(arm=arm, classes=num_classes)


SCALES = {
    "paper": Scale(name="paper", model="nc_{arm}_resnet18_cifar{classes}",
                   n_majority={"cifar10": 5000, "cifar100": 500},
                   epochs={"balanced": 100, "imbalanced": 100}, lr=1e-4,
                   schedule="constant", eval_points=20),
    "cpu": Scale(name="cpu", model="nc_{arm}_cifar_cpu",
                 n_majority={"cifar10": 250, "cifar100": 100},
                 epochs={"balanced": 32, "imbalanced": 80}, lr=0.05,
                 schedule="cosine", warmup_steps=20, eval_points=6,
                 test_probe_per_class=200),
}


def get_setting(name: str) -> Setting:
  """The grid entry ``name``; an unknown name raises a ValueError listing the grid."""
  try:
    return GRID[name]
  except KeyError:
    raise ValueError(f"unknown setting {name!r}; the grid is: {', '.join(GRID)}") \
        from None


def get_scale(name: str) -> Scale:
  try:
    return SCALES[name]
  except KeyError:
    raise ValueError(f"unknown scale {name!r}; valid scales: {list(SCALES)}") from None

"""MOptEqs (Li et al., ICLR 2022) on CIFAR-10/100, Imagenette, ImageNet-100.

The paper's recipe: batch 128, SGD (momentum 0.9), weight decay 1e-3, lr 0.1 decayed
×0.1 at epochs 100/150/175 of 200; the models use Anderson forward and phantom
gradients backward (k = 5, damping 0.5). ``mopteqs_cifar10_15min`` is the same
recipe with its step schedule compressed into a 15-minute CPU budget (see
:func:`budget_train_config`). The GEQ experiments (``geq_recognition.py``) reuse
:func:`step_schedule_experiment`.
"""

from experiments.configs import register
from jdeq import data
from jdeq.experiment import ExperimentConfig
from jdeq.train import TrainConfig

# Dataset name, training-time augmentation of each benchmark.
DATASETS = {"cifar10": ("cifar10", True), "cifar100": ("cifar100", True),
            "imagenette": ("imagenette", True), "imagenet100": ("imagenet100", True)}
PAPER_EPOCHS = 200
PAPER_DECAY_EPOCHS = (100, 150, 175)
PAPER_BATCH_SIZE = 128
PAPER_LR = 0.1
CIFAR_TRAIN_IMAGES = 50000

# Budget runs: 15 minutes of a 2-core x86 CPU in all, i.e. at most 11.5 minutes of
# training, then compilation of the evaluation and the full test split (≈ 2 min
# MOptEqs, ≈ 2.5 min GEQ) and the report. Measured training steps at batch 64
# (steady state in the training loop, real CIFAR-10, the machine shared with other
# jobs): MOptEqs ≈ 2.5 s, GEQ ≈ 3.5 s, forward NFE 4; the step counts below leave
# about 10% of the 11.5 minutes spare.
BUDGET_BATCH_SIZE = 64
BUDGET_STEPS = {"mopteqs": 240, "geq": 180}
BUDGET_MINUTES = 11.5


def paper_train_config() -> TrainConfig:
  """SGD 0.1, momentum 0.9, wd 1e-3, ×0.1 at 100/150/175 of 200 epochs."""
  return TrainConfig(optimizer="sgd", lr=PAPER_LR, momentum=0.9, weight_decay=1e-3,
                     schedule="step", epochs=PAPER_EPOCHS,
                     decay_epochs=PAPER_DECAY_EPOCHS, decay_factor=0.1,
                     log_every=100, eval_every=3900, checkpoint_every=2000)


def budget_train_config(steps: int, batch_size: int = BUDGET_BATCH_SIZE,
                        minutes: float = BUDGET_MINUTES) -> TrainConfig:
  """The paper's step schedule compressed into ``steps`` steps of ``batch_size``.

  The decays keep their relative positions (50%, 75%, 87.5% of training), the
  learning rate is the paper's 0.1 scaled linearly with the batch (0.05 at 64), and
  ``max_minutes`` stops the run cleanly if the machine is slower than measured.

  Batch 64 rather than the paper's 128 [choice]: a step costs about proportionally
  to the batch on a CPU (images/s is nearly the same at 64 and 128), so the halved
  batch buys twice the SGD updates in the same minutes, which is what a run of a
  few hundred steps is short of.
  """
  steps_per_epoch = CIFAR_TRAIN_IMAGES // batch_size
  decay_epochs = tuple(steps * epoch / PAPER_EPOCHS / steps_per_epoch
                       for epoch in PAPER_DECAY_EPOCHS)
  return TrainConfig(optimizer="sgd", lr=PAPER_LR * batch_size / PAPER_BATCH_SIZE,
                     momentum=0.9, weight_decay=1e-3, schedule="step",
                     total_steps=steps, decay_epochs=decay_epochs, decay_factor=0.1,
                     log_every=10, checkpoint_every=100, max_minutes=minutes)


def step_schedule_experiment(family: str, dataset: str, train: TrainConfig, *,
                             batch_size: int = PAPER_BATCH_SIZE) -> ExperimentConfig:
  """``{family}_{dataset}`` model with the papers' data setup and ``train``."""
  name, augment = DATASETS[dataset]
  return ExperimentConfig(
      model=f"{family}_{dataset}",
      data=data.DataConfig(name=name, batch_size=batch_size, augment=augment),
      train=train,
      description=f"{family} on {dataset}: batch {batch_size}, SGD {train.lr:g} "
                  f"(momentum 0.9, wd 1e-3), step decays ×0.1; Anderson forward, "
                  f"phantom gradients (k=5, damping 0.5).")


def budget_experiment(family: str, steps: int | None = None,
                      minutes: float = BUDGET_MINUTES) -> ExperimentConfig:
  """``{family}_cifar10`` with the schedule compressed to a CPU budget.

  Defaults: the 15-minute budget (``BUDGET_STEPS[family]`` steps, ``minutes`` of
  training at most).
  """
  steps = BUDGET_STEPS[family] if steps is None else steps
  return step_schedule_experiment(
      family, "cifar10", budget_train_config(steps, BUDGET_BATCH_SIZE, minutes),
      batch_size=BUDGET_BATCH_SIZE)


@register("mopteqs_cifar10")
def mopteqs_cifar10() -> ExperimentConfig:
  """MOptEqs small (3 branches × 32), CIFAR-10, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("mopteqs", "cifar10", paper_train_config())


@register("mopteqs_cifar100")
def mopteqs_cifar100() -> ExperimentConfig:
  """MOptEqs small, CIFAR-100, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("mopteqs", "cifar100", paper_train_config())


@register("mopteqs_imagenette")
def mopteqs_imagenette() -> ExperimentConfig:
  """MOptEqs (4 branches, 224×224 input), Imagenette, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("mopteqs", "imagenette", paper_train_config())


@register("mopteqs_imagenet100")
def mopteqs_imagenet100() -> ExperimentConfig:
  """MOptEqs (4 branches, 224×224 input), ImageNet-100, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("mopteqs", "imagenet100", paper_train_config())


@register("mopteqs_cifar10_15min")
def mopteqs_cifar10_15min() -> ExperimentConfig:
  """MOptEqs small, CIFAR-10, the paper's schedule compressed to 15 CPU minutes."""
  return budget_experiment("mopteqs")

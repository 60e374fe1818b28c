"""MOptEqs (Li et al., ICLR 2022; papers.md §5) on CIFAR-10/100, Imagenette, ImageNet-100.

The paper's recipe: batch 128, SGD (momentum 0.9), weight decay 1e-3, lr 0.1 decayed
×0.1 at epochs 100/150/175 of 200; the models use Anderson forward and phantom
gradients backward (k = 5, damping 0.5). ``mopteqs_cifar10_15min`` is the same
recipe with its step schedule compressed into a 15-minute CPU budget. The GEQ
experiments (``geq_recognition.py``) reuse :func:`step_schedule_experiment`.
"""

from experiments.configs import register
from jdeq.train import ExperimentConfig, TrainConfig

# Dataset name, training-time augmentation of each benchmark.
DATASETS = {"cifar10": ("cifar10", True), "cifar100": ("cifar100", True),
            "imagenette": ("imagenette", True), "imagenet100": ("imagenet100", True)}
PAPER_EPOCHS = 200
PAPER_DECAY_EPOCHS = (100, 150, 175)
# Budget runs: steps that fit 15 CPU minutes, measured for the small CIFAR models.
BUDGET_STEPS = 500
BUDGET_MINUTES = 14.0
CIFAR_STEPS_PER_EPOCH = 50000 // 128


def paper_train_config() -> TrainConfig:
  """SGD 0.1, momentum 0.9, wd 1e-3, ×0.1 at 100/150/175 of 200 epochs."""
  return TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3,
                     schedule="step", epochs=PAPER_EPOCHS,
                     decay_epochs=PAPER_DECAY_EPOCHS, decay_factor=0.1,
                     log_every=100, eval_every=3900, checkpoint_every=2000)


def budget_train_config() -> TrainConfig:
  """The paper's step schedule compressed into ``BUDGET_STEPS`` steps (≤ 15 min).

  The decays keep their relative positions (50%, 75%, 87.5% of training);
  ``max_minutes`` stops the run cleanly if the machine is slower than measured.
  """
  decay_epochs = tuple(BUDGET_STEPS * epoch / PAPER_EPOCHS / CIFAR_STEPS_PER_EPOCH
                       for epoch in PAPER_DECAY_EPOCHS)
  return TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3,
                     schedule="step", total_steps=BUDGET_STEPS,
                     decay_epochs=decay_epochs, decay_factor=0.1, log_every=10,
                     checkpoint_every=100, max_minutes=BUDGET_MINUTES)


def step_schedule_experiment(family: str, dataset: str,
                             train: TrainConfig) -> ExperimentConfig:
  """``{family}_{dataset}`` model with the papers' data setup and ``train``."""
  from jdeq import data
  name, augment = DATASETS[dataset]
  return ExperimentConfig(
      model=f"{family}_{dataset}",
      data=data.DataConfig(name=name, batch_size=128, augment=augment),
      train=train,
      description=f"{family} on {dataset}: batch 128, SGD 0.1 (momentum 0.9, wd "
                  f"1e-3), step decays ×0.1; Anderson forward, phantom gradients "
                  f"(k=5, damping 0.5).")


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
  return step_schedule_experiment("mopteqs", "cifar10", budget_train_config())

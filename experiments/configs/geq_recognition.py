"""GEQ (Li et al., NeurIPS 2023) on CIFAR-10/100, Imagenette, ImageNet-100.

GEQ's exact schedule is not public: "SGD with a step schedule", Anderson forward,
phantom gradients backward. We use the MOptEqs recipe of the same authors (batch 128,
SGD 0.1, momentum 0.9, weight decay 1e-3, ×0.1 at epochs 100/150/175 of 200);
``geq_cifar10_15min`` compresses it into the 15-minute CPU budget like MOptEqs'
(batch 64, fewer steps: a GEQ step costs about 1.4× a MOptEqs step).
"""

from experiments.configs import register
from experiments.configs.mopteqs_recognition import (budget_experiment,
                                                     paper_train_config,
                                                     step_schedule_experiment)
from jdeq.experiment import ExperimentConfig


@register("geq_cifar10")
def geq_cifar10() -> ExperimentConfig:
  """GEQ (3 Gaussian-kernel branches × 32), CIFAR-10, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("geq", "cifar10", paper_train_config())


@register("geq_cifar100")
def geq_cifar100() -> ExperimentConfig:
  """GEQ, CIFAR-100, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("geq", "cifar100", paper_train_config())


@register("geq_imagenette")
def geq_imagenette() -> ExperimentConfig:
  """GEQ (4 branches, 224×224 input), Imagenette, 200 epochs (needs a GPU)."""
  return step_schedule_experiment("geq", "imagenette", paper_train_config())


@register("geq_imagenet100")
def geq_imagenet100() -> ExperimentConfig:
  """GEQ (4 branches, 224×224 input), ImageNet-100 [paper: +2% over ResNet-50]."""
  return step_schedule_experiment("geq", "imagenet100", paper_train_config())


@register("geq_cifar10_15min")
def geq_cifar10_15min() -> ExperimentConfig:
  """GEQ, CIFAR-10, the step schedule compressed to 15 CPU minutes."""
  return budget_experiment("geq")

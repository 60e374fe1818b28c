"""MDEQ semantic segmentation on Cityscapes [75.1 mIoU small].

MDEQ: Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.

Labels are per pixel; the ignore label (255) has no weight in the loss and the
accuracy. Optimizer values (SGD, lr 0.01, weight decay 5e-4, batch 12) follow the
HRNet-style segmentation recipe MDEQ builds on; the reference's poly schedule is
replaced by the cosine one. Needs GPUs and the manually downloaded Cityscapes.
"""

from experiments.configs import register
from jdeq import data
from jdeq.experiment import ExperimentConfig
from jdeq.train import TrainConfig


def _cityscapes(model: str) -> ExperimentConfig:
  return ExperimentConfig(
      model=model,
      data=data.DataConfig(name="cityscapes", batch_size=12, augment=True),
      train=TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9,
                        weight_decay=5e-4, schedule="cosine", epochs=480,
                        pretrain_steps=10000, log_every=50, eval_every=5000,
                        checkpoint_every=1000),
      description=f"{model} on Cityscapes, 19 classes.")


@register("mdeq_cityscapes_small")
def mdeq_cityscapes_small() -> ExperimentConfig:
  """MDEQ-Small segmentation, Cityscapes."""
  return _cityscapes("mdeq_cityscapes_small")


@register("mdeq_cityscapes_large")
def mdeq_cityscapes_large() -> ExperimentConfig:
  """MDEQ-Large segmentation, Cityscapes."""
  return _cityscapes("mdeq_cityscapes_large")

"""MDEQ on ImageNet: SMALL [75.4% top-1] and LARGE [77.5%].

MDEQ: Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.

The optimizer settings (Nesterov SGD, lr 0.05, weight decay 5e-5, cosine, 100
epochs) are our reading of the reference configuration, not verified against it
here; change them with overrides (``train.lr=...``). Needs GPUs and the manually
downloaded ImageNet in the TFDS data directory.
"""

from experiments.configs import register
from jdeq import data
from jdeq.experiment import ExperimentConfig
from jdeq.train import TrainConfig


def _imagenet():
  return data.DataConfig(name="imagenet2012", batch_size=128, augment=True)


def _train(pretrain_steps: int) -> TrainConfig:
  return TrainConfig(optimizer="nesterov", lr=0.05, momentum=0.9,
                     weight_decay=5e-5, schedule="cosine", epochs=100,
                     pretrain_steps=pretrain_steps, log_every=100,
                     eval_every=10000, checkpoint_every=2000)


@register("mdeq_imagenet_small")
def mdeq_imagenet_small() -> ExperimentConfig:
  """MDEQ-Small on ImageNet-1k (≈18M params, 26/27 iterations, abs residual)."""
  return ExperimentConfig(model="mdeq_imagenet_small", data=_imagenet(),
                          train=_train(pretrain_steps=20000),
                          description="MDEQ-Small, ImageNet, 100 epochs.")


@register("mdeq_imagenet_large")
def mdeq_imagenet_large() -> ExperimentConfig:
  """MDEQ-Large on ImageNet-1k (≈63M params)."""
  return ExperimentConfig(model="mdeq_imagenet_large", data=_imagenet(),
                          train=_train(pretrain_steps=20000),
                          description="MDEQ-Large, ImageNet, 100 epochs.")

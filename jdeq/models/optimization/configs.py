"""Model configurations of MOptEqs and GEQ, and the named configurations.

Both are :class:`jdeq.models.ModelConfig` subclasses (frozen; unknown options raise a
``ValueError`` naming them) whose ``build(rngs=...)`` returns an
:class:`~jdeq.models.optimization.OptimizationClassifier`; the named configurations
below are registered, so ``jdeq.models.create("mopteqs_cifar10", rngs=...)`` works.
Defaults follow the papers (MOptEqs: Li et al., ICLR 2022; GEQ: Li et al., NeurIPS
2023) where they are public: 3 branches × 32 channels for the small MOptEqs, λ = 0.01, perturbation size ε = 0.1, γ = 0.2 / M, Anderson forward and
phantom gradients backward (k = 5, damping 0.5). The rest (stem, head width, solver
budgets, norm bounds, the ImageNet-scale widths) are our choices, documented in
docs/optimization_cells.md.
"""

from __future__ import annotations

from typing import Optional

from flax import nnx

import jdeq
from jdeq import config, require, require_positive
from jdeq.models.optimization.classifier import OptimizationClassifier
from jdeq.models.optimization.geq import GEQCell, is_convex
from jdeq.models.optimization.mopteqs import MOptEqsCell
from jdeq.models.registry import ModelConfig, register


@config
class OptimizationModelConfig(ModelConfig):
  """Fields shared by the MOptEqs and GEQ classifiers.

  Attributes:
    num_classes: classifier outputs.
    image_shape: ``(H, W, C)`` of the input images.
    stem_channels: channels of the stem output ``x`` (the cell's input features).
    stem_stride: 1 (CIFAR), 2 or 4 (ImageNet-like inputs: input / 4).
    channels: channels of each branch, finest first; branch ``i`` runs at
      ``1/2^i`` of the stem resolution.
    head_channels: width of the fused features before pooling.
    dropout: dropout rate before the linear classifier (training only).
    perturbation_size: ε of the perturbation strategy (0 disables it).
    solver: forward solver in training.
    eval_solver: forward solver in evaluation.
    grad: gradient mode of the equilibrium.
    unrolled_steps: cell steps backpropagated in the unrolled (pretraining) mode.
  """
  num_classes: int = 10
  image_shape: tuple = (32, 32, 3)
  stem_channels: int = 32
  stem_stride: int = 1
  channels: tuple = (32, 32, 32)
  head_channels: int = 128
  dropout: float = 0.0
  perturbation_size: float = 0.0
  solver: jdeq.AbstractSolver = jdeq.Anderson(max_iter=18, tol=1e-3, m=5)
  eval_solver: jdeq.AbstractSolver = jdeq.Anderson(max_iter=24, tol=1e-3, m=5)
  grad: jdeq.GradientMode = jdeq.Phantom(k=5, damping=0.5)
  unrolled_steps: int = 6

  def __post_init__(self) -> None:
    require(len(self.image_shape) == 3, self,
            f"image_shape must be (H, W, C), got {self.image_shape!r}")
    require(isinstance(self.channels, tuple) and len(self.channels) >= 1
            and all(isinstance(c, int) and c >= 1 for c in self.channels), self,
            f"channels must be a non-empty tuple of positive integers, got "
            f"{self.channels!r}")
    require(self.stem_stride in (1, 2, 4), self,
            f"stem_stride must be 1, 2 or 4, got {self.stem_stride!r}")
    divisor = self.stem_stride * 2 ** (len(self.channels) - 1)
    require(self.image_shape[0] % divisor == 0 and self.image_shape[1] % divisor == 0,
            self, f"image height and width must be divisible by stem_stride · "
            f"2^(branches − 1) = {divisor}, got {self.image_shape[:2]}")
    require_positive(self, num_classes=self.num_classes,
                     stem_channels=self.stem_channels,
                     head_channels=self.head_channels,
                     unrolled_steps=self.unrolled_steps)
    require(0 <= self.dropout < 1, self, f"dropout must be in [0, 1), got "
            f"{self.dropout!r}")
    require(self.perturbation_size >= 0, self,
            f"perturbation_size must be >= 0, got {self.perturbation_size!r}")

  def make_cell(self, *, rngs: nnx.Rngs):
    """The equilibrium cell (defined by the subclasses)."""
    raise NotImplementedError(f"{type(self).__name__} does not define make_cell()")

  def build(self, *, rngs: nnx.Rngs) -> OptimizationClassifier:
    """The classifier for this configuration (its :class:`jdeq.nn.DEQ` checks the
    solvers and the gradient mode)."""
    return OptimizationClassifier(self, rngs=rngs)


@config
class MOptEqsConfig(OptimizationModelConfig):
  """MOptEqs (Li et al., ICLR 2022): coupled linear-kernel branches.

  Attributes:
    coupling: λ, weight of the cross-resolution term.
    max_norm: bound on ``‖W_i‖₂`` (< 1: strongly convex objective).
  """
  perturbation_size: float = 0.1
  coupling: float = 0.01
  max_norm: float = 0.9

  def __post_init__(self) -> None:
    super().__post_init__()
    require(0 < self.max_norm < 1, self,
            f"max_norm must be in (0, 1) for a convex objective, got {self.max_norm!r}")
    require(self.coupling >= 0, self, f"coupling must be >= 0, got {self.coupling!r}")

  def make_cell(self, *, rngs: nnx.Rngs) -> MOptEqsCell:
    return MOptEqsCell(self.stem_channels, self.channels, coupling=self.coupling,
                       max_norm=self.max_norm, rngs=rngs)


@config
class GEQConfig(OptimizationModelConfig):
  """GEQ (Li et al., NeurIPS 2023): Gaussian-kernel branches at several scales.

  Attributes:
    max_norm: bound ``c_w`` on ``‖W‖₂``.
    hidden_max_norm: bound ``c_h`` on ``‖W_h‖₂``; convexity needs
      ``c_w² + 2e^{−3/2} c_h² <= 1``.
    gamma_scale: the 0.2 of ``γ = 0.2 / M``.
    gamma: fixed kernel width instead of the rule (None: the rule).
    coupling: optional MOptEqs-style coupling of neighbouring branches.
  """
  max_norm: float = 0.8
  hidden_max_norm: float = 0.8
  gamma_scale: float = 0.2
  gamma: Optional[float] = None
  coupling: float = 0.0

  def __post_init__(self) -> None:
    super().__post_init__()
    require(self.max_norm > 0 and self.hidden_max_norm > 0
            and is_convex(self.max_norm, self.hidden_max_norm), self,
            f"max_norm={self.max_norm!r}, hidden_max_norm={self.hidden_max_norm!r} "
            f"do not certify a convex objective (need max_norm² + 0.446·"
            f"hidden_max_norm² <= 1, hidden_max_norm <= 1)")
    require_positive(self, gamma_scale=self.gamma_scale)
    require(self.gamma is None or self.gamma > 0, self,
            f"gamma must be None or > 0, got {self.gamma!r}")
    require(self.coupling >= 0, self, f"coupling must be >= 0, got {self.coupling!r}")

  def make_cell(self, *, rngs: nnx.Rngs) -> GEQCell:
    return GEQCell(self.stem_channels, self.channels, max_norm=self.max_norm,
                   hidden_max_norm=self.hidden_max_norm,
                   gamma_scale=self.gamma_scale, gamma=self.gamma,
                   coupling=self.coupling, rngs=rngs)


# ImageNet-like inputs: 224×224 crops, stem to 56×56, four branches down to 7×7.
_IMAGENET_LIKE = dict(image_shape=(224, 224, 3), stem_channels=64, stem_stride=4,
                      channels=(64, 128, 256, 512), head_channels=1024,
                      solver=jdeq.Anderson(max_iter=22, tol=1e-3, m=5),
                      eval_solver=jdeq.Anderson(max_iter=26, tol=1e-3, m=5),
                      grad=jdeq.Phantom(k=5, damping=0.6))


def _named() -> dict[str, OptimizationModelConfig]:
  named = {}
  for family, cls in (("mopteqs", MOptEqsConfig), ("geq", GEQConfig)):
    named[f"{family}_cifar10"] = cls()
    named[f"{family}_cifar100"] = cls(num_classes=100)
    named[f"{family}_imagenette"] = cls(num_classes=10, **_IMAGENET_LIKE)
    named[f"{family}_imagenet100"] = cls(num_classes=100, **_IMAGENET_LIKE)
  return named


CONFIGS: dict[str, OptimizationModelConfig] = _named()
for _name, _config in CONFIGS.items():
  register(_name, _config)

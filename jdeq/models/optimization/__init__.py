"""Optimization-induced equilibrium cells: OptEq, MOptEqs and GEQ.

A cell here is defined by a hidden objective ``G(z; x)``; its update is one
proximal-gradient step ``T(z) = ReLU(z − ∇G_s(z))``, so its equilibria are ``G``'s
minimizers. See docs/optimization_cells.md for the derivations.

Named model configurations (``mopteqs_cifar10``, ``geq_cifar10``, ... for CIFAR-10,
CIFAR-100, Imagenette and ImageNet-100) are registered with
:mod:`jdeq.models.registry`: ``jdeq.models.create("geq_cifar10", rngs=nnx.Rngs(0))``.
"""

from jdeq.models.optimization.branches import (GaussianKernelBranch, LinearKernelBranch,
                                               MultiBranchCell, MultiBranchObjective)
from jdeq.models.optimization.classifier import OptimizationClassifier
from jdeq.models.optimization.configs import (CONFIGS, GEQConfig, MOptEqsConfig,
                                              OptimizationModelConfig)
from jdeq.models.optimization.geq import GEQCell, kernel_width
from jdeq.models.optimization.mopteqs import MOptEqsCell, OptEqCell
from jdeq.models.optimization.objective import Objective, OptimizationCell

__all__ = (
    "CONFIGS", "GEQCell", "GEQConfig", "GaussianKernelBranch",
    "LinearKernelBranch", "MOptEqsCell", "MOptEqsConfig", "MultiBranchCell",
    "MultiBranchObjective",
    "Objective", "OptEqCell", "OptimizationCell", "OptimizationClassifier",
    "OptimizationModelConfig", "kernel_width",
)

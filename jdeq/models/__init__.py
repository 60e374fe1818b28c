"""Model families of jdeq and their named configurations.

``create(name, rngs=nnx.Rngs(0), **overrides)`` builds a registered model;
``list_configs()`` names them and ``get_config(name)`` returns the frozen config.
Families: MDEQ (:mod:`jdeq.models.mdeq`), small MLP/conv DEQs
(:mod:`jdeq.models.cells`) and, when present, the optimization-induced models of
:mod:`jdeq.models.optimization`, which register themselves here.
"""

import importlib.util

from jdeq.models.registry import (ModelConfig, Reference, create, get_config,
                                  list_configs, reference, register)
from jdeq.models import mdeq_configs  # registers the MDEQ configurations
from jdeq.models import cells  # registers the small cells' configurations
from jdeq.models.cells import ConvDEQConfig, MLPDEQConfig
from jdeq.models.mdeq import MDEQ, MDEQCell, MDEQConfig

# The optimization-induced family is developed alongside; register it when present.
_optimization = importlib.util.find_spec("jdeq.models.optimization")
if _optimization is not None and _optimization.origin is not None:
  from jdeq.models import optimization  # noqa: F401  (registers its configurations)

__all__ = (
    "ConvDEQConfig", "MDEQ", "MDEQCell", "MDEQConfig", "MLPDEQConfig", "ModelConfig",
    "Reference", "create", "get_config", "list_configs", "reference", "register",
)

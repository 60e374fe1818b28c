"""Model families of jdeq and their named configurations.

``create(name, rngs=nnx.Rngs(0), **overrides)`` builds a registered model;
``list_configs()`` names them and ``get_config(name)`` returns the frozen config.
Families: MDEQ (:mod:`jdeq.models.mdeq`), small MLP/conv DEQs
(:mod:`jdeq.models.cells`), the optimization-induced models of
:mod:`jdeq.models.optimization` and the DEQ-Transformer language model
(:mod:`jdeq.models.deq_transformer`); importing a family registers its
configurations. The classifiers are :class:`jdeq.nn.DEQNetwork` shells and so follow
the model contract (:class:`jdeq.nn.EquilibriumModel`); the language model takes
tokens and a segment memory instead.
"""

from jdeq.models import cells  # registers the small cells' configurations
from jdeq.models import mdeq_configs  # registers the MDEQ configurations
from jdeq.models import optimization  # registers MOptEqs and GEQ
from jdeq.models import neural_collapse  # registers the neural-collapse study's arms
from jdeq.models import deq_transformer  # registers the DEQ-Transformer language models
from jdeq.models.cells import ConvDEQConfig, MLPDEQConfig, SmallDEQConfig
from jdeq.models.deq_transformer import DEQTransformerConfig, DEQTransformerLM
from jdeq.models.mdeq import MDEQ, MDEQCell, MDEQConfig
from jdeq.models.registry import (ModelConfig, Reference, create, get_config,
                                  list_configs, reference, register)

__all__ = (
    "ConvDEQConfig", "DEQTransformerConfig", "DEQTransformerLM", "MDEQ", "MDEQCell",
    "MDEQConfig", "MLPDEQConfig", "ModelConfig", "Reference", "SmallDEQConfig",
    "create", "get_config", "list_configs", "reference", "register",
)

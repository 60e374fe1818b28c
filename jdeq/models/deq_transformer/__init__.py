"""The DEQ-Transformer language model (Bai, Kolter & Koltun, 2019; Bai et al., 2021).

* :mod:`.attention` — Transformer-XL relative-position attention (pure functions);
* :mod:`.adaptive` — adaptive embedding and adaptive softmax, tied;
* :mod:`.model` — :class:`DEQTransformerCell`, :class:`DEQTransformerLM`, its
  :class:`DEQTransformerConfig`, the segment :class:`Memory` and :class:`LMAux`;
* :mod:`.configs` — the named configurations (importing registers them).
"""

from jdeq.models.deq_transformer import configs  # registers the named configurations
from jdeq.models.deq_transformer.adaptive import (AdaptiveEmbedding, AdaptiveSoftmax,
                                                  AdaptiveVocabulary)
from jdeq.models.deq_transformer.model import (CellInput, DEQTransformerCell,
                                               DEQTransformerConfig, DEQTransformerLM,
                                               LMAux, Memory, layer_norm)

__all__ = (
    "AdaptiveEmbedding", "AdaptiveSoftmax", "AdaptiveVocabulary", "CellInput",
    "DEQTransformerCell", "DEQTransformerConfig", "DEQTransformerLM", "LMAux", "Memory",
    "layer_norm",
)

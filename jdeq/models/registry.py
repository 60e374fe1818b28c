"""Model configurations by name.

A model family defines a :class:`ModelConfig` subclass (a frozen, validated config
that knows how to ``build`` its model) and registers named instances of it::

  register("mdeq_cifar_tiny", MDEQConfig(...), reference_params=158_890,
           reference_source="analytic count of ... cls_mdeq_TINY.yaml")

``create(name_or_config, rngs=..., **overrides)`` then builds the model. Reference
parameter counts (with their source) live next to the configs that claim them, and
the tests compare every registered model against its figure.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

from flax import nnx

from jdeq import config


@config
class ModelConfig:
  """Base of model configurations; subclasses add their fields and ``build``."""

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    """Constructs the model (``rngs`` seeds parameters and the model's streams)."""
    raise NotImplementedError(f"{type(self).__name__} does not define build()")


def _is_model_config(obj: object) -> bool:
  """A ModelConfig, or any frozen dataclass config with a ``build(rngs=...)``."""
  return isinstance(obj, ModelConfig) or (
      dataclasses.is_dataclass(obj) and not isinstance(obj, type)
      and callable(getattr(obj, "build", None)))


class Reference(NamedTuple):
  """A published/derived parameter count and where it comes from."""
  params: int
  source: str


_CONFIGS: dict[str, ModelConfig] = {}
_REFERENCES: dict[str, Reference] = {}


def register(name: str, model_config: ModelConfig, *,
             reference_params: Optional[int] = None, reference_source: str = "") -> None:
  """Registers ``model_config`` under ``name`` (names are unique).

  Args:
    name: the configuration's name (e.g. ``"mdeq_cifar_tiny"``).
    model_config: a :class:`ModelConfig` instance (or any frozen dataclass config
      with a ``build(*, rngs)`` method).
    reference_params: the reference implementation's parameter count, if known.
    reference_source: where that count comes from (required with the count).
  """
  if not _is_model_config(model_config):
    raise ValueError(f"register({name!r}): expected a model config with build(), got "
                     f"{type(model_config).__name__}")
  if name in _CONFIGS:
    raise ValueError(f"register: a model configuration named {name!r} already exists")
  if reference_params is not None and not reference_source:
    raise ValueError(f"register({name!r}): a reference count needs its source")
  _CONFIGS[name] = model_config
  if reference_params is not None:
    _REFERENCES[name] = Reference(int(reference_params), reference_source)


def list_configs() -> list[str]:
  """The registered configuration names, sorted."""
  return sorted(_CONFIGS)


def get_config(name: str) -> ModelConfig:
  """The configuration registered as ``name``."""
  try:
    return _CONFIGS[name]
  except KeyError:
    raise ValueError(f"unknown model configuration {name!r}; registered: "
                     f"{list_configs()}") from None


def reference(name: str) -> Optional[Reference]:
  """The reference parameter count of ``name``, or None if it has none."""
  get_config(name)
  return _REFERENCES.get(name)


def create(name_or_config: Union[str, ModelConfig], *, rngs: nnx.Rngs,
           **overrides) -> nnx.Module:
  """Builds a model from a registered name or a config, with field overrides.

  Unknown override names raise a ``ValueError`` naming them.
  """
  model_config = (get_config(name_or_config) if isinstance(name_or_config, str)
                  else name_or_config)
  if not _is_model_config(model_config):
    raise ValueError(f"create: expected a configuration name or a ModelConfig, got "
                     f"{type(model_config).__name__}")
  if overrides:
    model_config = dataclasses.replace(model_config, **overrides)
  return model_config.build(rngs=rngs)

"""The registry of experiment configurations, one module per paper experiment.

Every module in this package is imported on first use and registers its
experiments with :func:`register`, so adding an experiment means adding a file,
e.g. ``mopteqs_cifar10.py`` or ``geq_imagenet100.py``::

  from experiments.configs import register
  from jdeq import data
  from jdeq.experiment import ExperimentConfig
  from jdeq.train import TrainConfig

  @register("mopteqs_cifar10")
  def mopteqs_cifar10() -> ExperimentConfig:
    return ExperimentConfig(model="mopteqs_cifar_small", data=data.DataConfig(...),
                            train=TrainConfig(...))

The functions run only when their experiment is selected, so listing the registry
does not build any configuration.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from jdeq.experiment import ExperimentConfig

Factory = Callable[[], ExperimentConfig]
_REGISTRY: dict[str, Factory] = {}
_DISCOVERED = False


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator registering ``factory`` under ``name`` (names must be unique)."""

  def decorator(factory: Factory) -> Factory:
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      raise ValueError(f"experiment {name!r} is registered twice "
                       f"({_REGISTRY[name].__module__} and {factory.__module__})")
    _REGISTRY[name] = factory
    return factory

  return decorator


def _discover() -> None:
  global _DISCOVERED
  if not _DISCOVERED:
    for module in pkgutil.iter_modules(__path__):
      importlib.import_module(f"{__name__}.{module.name}")
    _DISCOVERED = True


def names() -> list[str]:
  """All registered experiment names, sorted."""
  _discover()
  return sorted(_REGISTRY)


def describe() -> dict[str, str]:
  """Name -> first line of the factory's docstring."""
  _discover()
  return {name: (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]
          if _REGISTRY[name].__doc__ else "" for name in sorted(_REGISTRY)}


def get(name: str) -> ExperimentConfig:
  """Builds the experiment registered as ``name``."""
  _discover()
  if name not in _REGISTRY:
    raise ValueError(f"unknown config {name!r}; valid configs: {names()}")
  return _REGISTRY[name]()

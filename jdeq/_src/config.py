"""Frozen, validated, hashable configuration dataclasses.

Every configuration object of jdeq (solvers, gradient modes, models, training) is
built with :func:`config`. Such a class is a frozen dataclass (hashable, so it can be
a static argument of ``jax.jit``) whose constructor rejects unknown keyword options
with a ``ValueError`` naming them, instead of the ``TypeError`` of a plain dataclass
or the silent acceptance of dict-based configs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def config(cls: type[T]) -> type[T]:
  """Turns ``cls`` into a frozen dataclass whose constructor names unknown options."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  field_names = tuple(f.name for f in dataclasses.fields(cls))
  original_init = cls.__init__

  @functools.wraps(original_init)
  def __init__(self, *args: Any, **kwargs: Any) -> None:
    unknown = sorted(set(kwargs) - set(field_names))
    if unknown:
      raise ValueError(
          f"{cls.__name__}: unknown option(s) {unknown}; valid options are "
          f"{list(field_names)}")
    if len(args) > len(field_names):
      raise ValueError(
          f"{cls.__name__}: takes at most {len(field_names)} positional options, "
          f"got {len(args)}")
    original_init(self, *args, **kwargs)

  cls.__init__ = __init__
  return cls


def from_dict(cls: type[T], options: Mapping[str, Any]) -> T:
  """Builds config ``cls`` from a mapping, rejecting unknown keys by name."""
  return cls(**dict(options))


def require(condition: bool, owner: object, message: str) -> None:
  """Raises ``ValueError(f"{type(owner).__name__}: {message}")`` unless ``condition``."""
  if not condition:
    raise ValueError(f"{type(owner).__name__}: {message}")


def require_positive(owner: object, **values: float) -> None:
  """Checks that every named value is > 0, naming the first that is not."""
  for name, value in values.items():
    require(value > 0, owner, f"{name} must be > 0, got {value!r}")


def require_choice(owner: object, name: str, value: Any, choices: tuple) -> None:
  """Checks that ``value`` is one of ``choices``, naming the option."""
  require(value in choices, owner,
          f"{name} must be one of {list(choices)}, got {value!r}")

"""Experiments: a model configuration, a data configuration and a training configuration.

This is the one layer that knows models, data and training together; it sits above
:mod:`jdeq.models`, :mod:`jdeq.data` and :mod:`jdeq.train`, none of which imports it.
An :class:`ExperimentConfig` names a registered model configuration
(``jdeq.models.get_config``) plus overrides of its fields, and holds a
``jdeq.data.DataConfig`` and a :class:`TrainConfig`. Command-line overrides address
nested fields with dotted keys::

  train.lr=0.01   data.batch_size=64   model.dropout=0.1   model.solver.max_iter=30

Values are parsed as Python literals (``0.01``, ``(30, 60)``, ``None``, ``True``),
anything else is taken as a string (``train.optimizer=sgd``). An unknown section or
field is a ``ValueError`` listing the valid ones, and so is a value of the wrong
type for its field (``train.lr=abc``), checked against the field's annotation.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import types
import typing
from typing import Any, Mapping, Optional, Sequence

from flax import nnx

import jdeq
from jdeq import data, models
from jdeq.train import Classification, LanguageModeling, TrainConfig, fit, reporting

SECTIONS = ("model", "data", "train")


@jdeq.config
class ExperimentConfig:
  """One paper experiment.

  Attributes:
    model: name of a model configuration in ``jdeq.models``.
    data: a ``jdeq.data.DataConfig``.
    train: the training configuration.
    model_overrides: dotted field path -> value, applied to the model
      configuration (e.g. ``{"dropout": 0.0, "solver.max_iter": 12}``).
    description: what the experiment reproduces and its expected result.
  """
  model: str
  data: Any
  train: TrainConfig
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""


def parse_override(text: str) -> tuple[str, Any]:
  """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``."""
  key, separator, raw = text.partition("=")
  key = key.strip()
  if not separator or not key:
    raise ValueError(f"override {text!r} is not of the form section.field=value "
                     f"(sections: {list(SECTIONS)})")
  try:
    value = ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError):
    value = raw.strip()
  return key, value


def _accepted_types(annotation: Any) -> Optional[tuple[type, ...]]:
  """The classes a field annotation admits, or None where it admits anything.

  ``Optional``/unions admit each member's classes, ``tuple[int, ...]`` and the like
  their origin (``tuple``); ``Any``, ``Literal``, type variables and callables
  admit anything (the configuration's own validation still runs).
  """
  if annotation is Any:
    return None
  origin = typing.get_origin(annotation)
  if origin is typing.Union or origin is types.UnionType:
    accepted: tuple[type, ...] = ()
    for member in typing.get_args(annotation):
      member_types = _accepted_types(member)
      if member_types is None:
        return None
      accepted += member_types
    return accepted
  if origin is not None:
    return (origin,) if isinstance(origin, type) else None
  if annotation is type(None):
    return (type(None),)
  return (annotation,) if isinstance(annotation, type) else None


def _typed_value(obj: Any, name: str, value: Any, owner: str) -> Any:
  """``value`` for field ``name`` of the dataclass ``obj``, checked against its type.

  The type is the field's annotation (``typing.get_type_hints``). An ``int`` is
  taken for a ``float`` (and converted), a list for a ``tuple``; a ``bool`` only
  for a ``bool``. An annotation that does not resolve admits anything.

  Raises:
    ValueError: naming the override, the expected type and the value given.
  """
  try:
    annotation = typing.get_type_hints(type(obj)).get(name, Any)
  except (NameError, TypeError):  # names only a type checker can resolve
    return value
  accepted = _accepted_types(annotation)
  if accepted is None:
    return value
  if isinstance(value, bool):
    if bool in accepted:
      return value
  elif isinstance(value, accepted):
    return value
  elif float in accepted and isinstance(value, int):
    return float(value)
  elif tuple in accepted and isinstance(value, list):
    return tuple(value)
  expected = " or ".join(sorted({"None" if t is type(None) else t.__name__
                                 for t in accepted}))
  raise ValueError(f"override {owner}.{name}={value!r}: expected {expected}, got "
                   f"{type(value).__name__}")


def _replace(obj: Any, owner: str, **changes: Any) -> Any:
  """``dataclasses.replace``, with a type error of the validation named as a value error."""
  try:
    return dataclasses.replace(obj, **changes)
  except TypeError as error:
    raise ValueError(f"{owner}: {error}") from error


def replace_path(obj: Any, path: Sequence[str], value: Any, *,
                 owner: str) -> Any:
  """``dataclasses.replace`` along a dotted path of nested dataclass fields."""
  if not dataclasses.is_dataclass(obj):
    raise ValueError(f"{owner}: {type(obj).__name__} has no fields to override")
  names = [f.name for f in dataclasses.fields(obj)]
  head = path[0]
  if head not in names:
    raise ValueError(f"unknown option {owner}.{head}; valid {owner} options: {names}")
  if len(path) > 1:
    value = replace_path(getattr(obj, head), path[1:], value,
                         owner=f"{owner}.{head}")
  else:
    value = _typed_value(obj, head, value, owner)
  return _replace(obj, owner, **{head: value})


def model_config(experiment: ExperimentConfig) -> Any:
  """The model configuration with the experiment's overrides applied."""
  try:
    base = models.get_config(experiment.model)
  except (KeyError, ValueError) as error:
    raise ValueError(f"unknown model configuration {experiment.model!r}; valid: "
                     f"{models.list_configs()}") from error
  for key, value in experiment.model_overrides.items():
    base = replace_path(base, key.split("."), value, owner="model")
  return base


def replace_paths(obj: Any, assignments: Mapping[tuple[str, ...], Any], *,
                  owner: str) -> Any:
  """Applies several dotted-path assignments with one ``replace`` per dataclass.

  Validation runs once on the final values, so interdependent fields can change
  together (``train.epochs=None train.total_steps=500``).
  """
  if not dataclasses.is_dataclass(obj):
    raise ValueError(f"{owner}: {type(obj).__name__} has no fields to override")
  names = [f.name for f in dataclasses.fields(obj)]
  direct, nested = {}, {}
  for path, value in assignments.items():
    if path[0] not in names:
      raise ValueError(f"unknown option {owner}.{path[0]}; valid {owner} options: "
                       f"{names}")
    if len(path) == 1:
      direct[path[0]] = _typed_value(obj, path[0], value, owner)
    else:
      nested.setdefault(path[0], {})[path[1:]] = value
  for head, sub in nested.items():
    direct[head] = replace_paths(direct.get(head, getattr(obj, head)), sub,
                                 owner=f"{owner}.{head}")
  return _replace(obj, owner, **direct)


def apply_overrides(experiment: ExperimentConfig,
                    overrides: Sequence[str]) -> ExperimentConfig:
  """Applies ``section.field=value`` strings, validating every key and value type.

  Raises:
    ValueError: an unknown section or field (the valid ones listed), a value of
      the wrong type for its field, or one the configuration rejects.
  """
  by_section: dict[str, dict[tuple[str, ...], Any]] = {s: {} for s in SECTIONS}
  for text in overrides:
    key, value = parse_override(text)
    section, *path = key.split(".")
    if section not in SECTIONS or not path:
      raise ValueError(f"override {text!r}: the key must be section.field with "
                       f"section one of {list(SECTIONS)}")
    by_section[section][tuple(path)] = value
  if by_section["model"]:
    experiment = dataclasses.replace(experiment, model_overrides={
        **experiment.model_overrides,
        **{".".join(path): value for path, value in by_section["model"].items()}})
    model_config(experiment)  # validates the keys and values now
  for section in ("data", "train"):
    if by_section[section]:
      experiment = dataclasses.replace(experiment, **{section: replace_paths(
          getattr(experiment, section), by_section[section], owner=section)})
  return experiment


def run_experiment(experiment: ExperimentConfig, *, workdir: str,
                   data_dir: Optional[str] = None, name: str = "",
                   progress: bool = True) -> dict[str, Any]:
  """Builds the data pipeline and the model, then :func:`jdeq.train.fit`.

  Args:
    experiment: the configuration.
    workdir: output directory; an existing checkpoint there is resumed.
    data_dir: TFDS data directory (overrides ``experiment.data.data_dir``; None
      leaves the pipeline to ``TFDS_DATA_DIR`` / the TFDS default).
    name: the experiment's registry name, recorded in the report.
    progress: show the progress bar.

  Returns:
    The run report.

  Raises:
    ValueError: ``workdir`` is not writable (checked before the data is read),
      or a configuration value is invalid.
  """
  reporting.check_writable(workdir)
  data_config = experiment.data
  if data_dir is not None:
    data_config = dataclasses.replace(data_config, data_dir=data_dir)
  resolved_model = model_config(experiment)
  meta = {"experiment": name, "description": experiment.description,
          "model": resolved_model, "data": data_config}
  if isinstance(data_config, data.TextDataConfig):
    return _run_language_model(experiment, resolved_model, data_config, meta,
                               workdir=workdir, progress=progress)
  info = data.dataset_info(data_config)
  steps_per_epoch = max(1, info.num_train // data_config.batch_size)
  model = models.create(resolved_model, rngs=nnx.Rngs(experiment.train.seed))
  return fit(
      model, experiment.train,
      train_batches=lambda start: data.train_batches(data_config, start_step=start),
      eval_batches=lambda: data.eval_batches(data_config, split="test"),
      steps_per_epoch=steps_per_epoch, workdir=workdir,
      meta={**meta, "dataset": {"num_train": info.num_train,
                                "num_test": info.num_test,
                                "num_classes": info.num_classes,
                                "image_shape": info.image_shape}},
      progress=progress, task=Classification())


def _run_language_model(experiment: ExperimentConfig, model_config_: Any,
                        data_config: Any, meta: dict, *, workdir: str,
                        progress: bool) -> dict[str, Any]:
  """:func:`run_experiment` for a language model on a text corpus.

  Training walks the train split in segments with the memory carried from
  batch to batch; evaluation runs over the whole validation split, carrying the
  memory too. The model's vocabulary must be the corpus's.
  """
  info = data.text_info(data_config)
  if getattr(model_config_, "vocab_size", info.vocab_size) != info.vocab_size:
    raise ValueError(
        f"model {experiment.model} has vocab_size {model_config_.vocab_size}, but "
        f"the {data_config.name} vocabulary has {info.vocab_size} types (set "
        f"model.vocab_size={info.vocab_size})")
  model = models.create(model_config_, rngs=nnx.Rngs(experiment.train.seed))
  report = fit(
      model, experiment.train,
      train_batches=lambda start: data.lm_train_batches(data_config, start_step=start),
      eval_batches=lambda: data.lm_eval_batches(data_config, split="validation"),
      steps_per_epoch=info.steps_per_epoch, workdir=workdir,
      meta={**meta, "dataset": {"vocab_size": info.vocab_size,
                                "num_tokens": dict(info.num_tokens),
                                "unigram_perplexity": info.unigram_perplexity},
            "eval_split": "validation"},
      progress=progress, task=LanguageModeling())
  report["unigram_perplexity"] = info.unigram_perplexity
  return report


def finished_report(workdir: str, experiment: ExperimentConfig) -> dict[str, Any]:
  """The report of the finished run of ``experiment`` in ``workdir``.

  Raises:
    ValueError: ``workdir`` holds no finished run (no ``report.json``), or one of a
      different experiment (its recorded train or data settings differ; where the
      data lives does not count).
  """
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    raise ValueError(f"no report.json in {workdir} (the run has not finished)")
  with open(path) as handle:
    report = json.load(handle)
  expected = {"train": reporting.to_json(experiment.train),
              "data": reporting.to_json(experiment.data)}
  for section, value in expected.items():
    stored = dict(report.get("config", {}).get(section, {}))
    value = dict(value)
    for settings in (stored, value):
      settings.pop("data_dir", None)
    if stored != value:
      raise ValueError(f"the run in {workdir} is a different experiment: its "
                       f"{section} settings are {stored}, expected {value}")
  return report

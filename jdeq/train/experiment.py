"""Experiments: a model configuration, a data configuration and a training configuration.

An :class:`ExperimentConfig` names a registered model configuration
(``jdeq.models.get_config``) plus overrides of its fields, and holds a
``jdeq.data.DataConfig`` and a :class:`TrainConfig`. Command-line overrides address
nested fields with dotted keys::

  train.lr=0.01   data.batch_size=64   model.dropout=0.1   model.solver.max_iter=30

Values are parsed as Python literals (``0.01``, ``(30, 60)``, ``None``, ``True``),
anything else is taken as a string (``train.optimizer=sgd``). An unknown section or
field is a ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

from flax import nnx

from jdeq._src.config import config
from jdeq.train import reporting
from jdeq.train.config import TrainConfig
from jdeq.train.loop import fit

SECTIONS = ("model", "data", "train")


@config
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
  return dataclasses.replace(obj, **{head: value})


def model_config(experiment: ExperimentConfig) -> Any:
  """The model configuration with the experiment's overrides applied."""
  from jdeq import models  # the experiment layer sits above models and data
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
      direct[path[0]] = value
    else:
      nested.setdefault(path[0], {})[path[1:]] = value
  for head, sub in nested.items():
    direct[head] = replace_paths(direct.get(head, getattr(obj, head)), sub,
                                 owner=f"{owner}.{head}")
  return dataclasses.replace(obj, **direct)


def apply_overrides(experiment: ExperimentConfig,
                    overrides: Sequence[str]) -> ExperimentConfig:
  """Applies ``section.field=value`` strings, validating every key."""
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
  """Builds the data pipeline and the model, then :func:`~jdeq.train.fit`.

  Args:
    experiment: the configuration.
    workdir: output directory; an existing checkpoint there is resumed.
    data_dir: TFDS data directory (overrides ``experiment.data.data_dir``; None
      leaves the pipeline to ``TFDS_DATA_DIR`` / the TFDS default).
    name: the experiment's registry name, recorded in the report.
    progress: show the progress bar.

  Returns:
    The run report.
  """
  from jdeq import data, models
  data_config = experiment.data
  if data_dir is not None:
    data_config = dataclasses.replace(data_config, data_dir=data_dir)
  info = data.dataset_info(data_config)
  steps_per_epoch = max(1, info.num_train // data_config.batch_size)
  resolved_model = model_config(experiment)
  model = models.create(resolved_model, rngs=nnx.Rngs(experiment.train.seed))
  return fit(
      model, experiment.train,
      train_batches=lambda start: data.train_batches(data_config, start_step=start),
      eval_batches=lambda: data.eval_batches(data_config, split="test"),
      steps_per_epoch=steps_per_epoch, workdir=workdir,
      meta={"experiment": name, "description": experiment.description,
            "model": resolved_model, "data": data_config,
            "dataset": {"num_train": info.num_train, "num_test": info.num_test,
                        "num_classes": info.num_classes,
                        "image_shape": info.image_shape}},
      progress=progress)


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

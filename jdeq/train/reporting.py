"""What a run leaves behind: a JSON-lines metrics log, a JSON report and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def to_json(value: Any) -> Any:
  """A JSON-compatible copy: dataclasses become dicts, tuples lists, others str."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {"type": type(value).__name__,
            **{f.name: to_json(getattr(value, f.name))
               for f in dataclasses.fields(value)}}
  if isinstance(value, Mapping):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


class MetricsLog:
  """Appends one JSON object per line; on resume drops records past the restart.

  Records written after the last checkpoint of a killed run would otherwise appear
  twice once the resumed run reaches those steps again.
  """

  def __init__(self, path: str, *, resume_step: int = 0):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
    with open(path, "w") as handle:
      for record in kept:
        handle.write(json.dumps(record) + "\n")

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as handle:
      handle.write(json.dumps(to_json(record)) + "\n")


def read_records(path: str) -> list[dict]:
  """The records of a metrics log (empty if it does not exist)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as handle:
    for line in handle:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
  return records


def write_report(path: str, report: Mapping[str, Any]) -> None:
  """Writes the final report atomically (temporary file, then rename)."""
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    json.dump(to_json(report), handle, indent=2)
  os.replace(temporary, path)


def _series(records: Iterable[dict], kind: str, key: str):
  points = [(r["step"], r[key]) for r in records
            if r.get("kind") == kind and r.get(key) is not None]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict], directory: str) -> list[str]:
  """Learning curves and solver statistics over training, as PNG files.

  Returns:
    The paths written: ``curves.png`` (train loss; train and test accuracy) and
    ``solver.png`` (forward NFE; mean and max relative residual, log scale).
  """
  paths = []
  figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
  loss_axis.plot(*_series(records, "train", "loss"), label="train")
  loss_axis.plot(*_series(records, "eval", "loss"), "o-", label="test")
  loss_axis.set(xlabel="step", ylabel="cross-entropy", title="loss")
  accuracy_axis.plot(*_series(records, "train", "accuracy"), label="train")
  accuracy_axis.plot(*_series(records, "eval", "accuracy"), "o-", label="test")
  accuracy_axis.set(xlabel="step", ylabel="accuracy", title="accuracy")
  for axis in (loss_axis, accuracy_axis):
    axis.legend()
    axis.grid(alpha=0.3)
  figure.tight_layout()
  paths.append(os.path.join(directory, "curves.png"))
  figure.savefig(paths[-1], dpi=100)
  plt.close(figure)

  figure, (nfe_axis, residual_axis) = plt.subplots(1, 2, figsize=(10, 4))
  nfe_axis.plot(*_series(records, "train", "fwd_nfe"), label="train")
  nfe_axis.plot(*_series(records, "eval", "fwd_nfe"), "o-", label="test")
  nfe_axis.set(xlabel="step", ylabel="map evaluations", title="forward NFE")
  residual_axis.plot(*_series(records, "train", "residual"), label="train mean")
  residual_axis.plot(*_series(records, "train", "residual_max"), label="train max",
                     alpha=0.5)
  residual_axis.plot(*_series(records, "eval", "residual"), "o-", label="test mean")
  residual_axis.set(xlabel="step", ylabel="‖f(z)−z‖/‖f(z)‖",
                    title="relative residual at z*", yscale="log")
  for axis in (nfe_axis, residual_axis):
    axis.legend()
    axis.grid(alpha=0.3)
  figure.tight_layout()
  paths.append(os.path.join(directory, "solver.png"))
  figure.savefig(paths[-1], dpi=100)
  plt.close(figure)
  return paths

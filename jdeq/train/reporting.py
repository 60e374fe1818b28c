"""What a run leaves behind: a JSON-lines metrics log with its TensorBoard twin, a
JSON report and PNG plots; and what it shows on the console.

In a multi-process job only the primary process (index 0,
:func:`jdeq.train.distributed.is_primary`) writes these files, shows the progress
bar and prints: the others run the same code, whose writes here do nothing. Every
writer takes ``primary=`` to decide explicitly (None: ask the runtime).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import tempfile
import time
from typing import Any, Iterable, Mapping, Optional

import matplotlib
from tqdm import tqdm

from jdeq.train import distributed

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def _primary(primary: Optional[bool]) -> bool:
  return distributed.is_primary() if primary is None else bool(primary)


def echo(message: str, *, primary: Optional[bool] = None) -> None:
  """Prints ``message`` on the primary process only.

  Through tqdm, so that a progress bar on the same terminal is redrawn below it.
  """
  if _primary(primary):
    tqdm.write(message)


class ProgressBar(tqdm):
  """A tqdm progress bar shown by the primary process only.

  On the other processes it is disabled and its :meth:`write` prints nothing, so
  the same loop code runs everywhere without repeating its output per process.
  """

  def __init__(self, *args: Any, disable: bool = False,
               primary: Optional[bool] = None, **kwargs: Any):
    self.primary = _primary(primary)
    super().__init__(*args, disable=disable or not self.primary, **kwargs)

  def write(self, s: str, file: Any = None, end: str = "\n",
            nolock: bool = False) -> None:
    """Prints ``s`` above the bar (tqdm's ``write``) on the primary process only."""
    if self.primary:
      tqdm.write(s, file=file, end=end, nolock=nolock)


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


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that a file can be written in it.

  Called before a run builds anything, so an output directory on a read-only
  path fails at once rather than at the first checkpoint.

  Raises:
    ValueError: naming the directory and the operating system's reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
      pass
  except OSError as error:
    reason = error.strerror or str(error)
    raise ValueError(
        f"workdir {workdir} is not writable ({type(error).__name__}: {reason}); a "
        f"run writes its checkpoints, metrics and report there") from error


# The record kinds mirrored as TensorBoard scalars ("start" holds run facts only).
TENSORBOARD_KINDS = ("train", "eval")


class MetricsLog:
  """Appends one JSON object per line, and its numbers as TensorBoard scalars.

  Each ``"train"`` or ``"eval"`` record's numeric fields are also written, with
  tags ``"<kind>/<field>"`` (``train/loss``, ``eval/accuracy``, ...) at the
  record's ``step``, to a TensorBoard event file in ``tensorboard_dir`` (by
  tensorboardX, which needs neither TensorFlow nor TensorBoard). Strings and
  booleans stay in the JSON lines only.

  On resume, records past the restart are dropped (from the JSON lines) or purged
  (TensorBoard hides the events at steps ``> resume_step`` of earlier files):
  records written after the last checkpoint of a killed run would otherwise
  appear twice once the resumed run reaches those steps again.

  Only the primary process writes: elsewhere the log touches no file and
  :meth:`write` does nothing (every process may call it with the same records).

  Args:
    path: the JSON-lines file.
    resume_step: the step the run restarts from (0 for a fresh run).
    tensorboard_dir: where the event files go; None: no TensorBoard output.
    primary: whether this process writes (None: :func:`distributed.is_primary`).
  """

  def __init__(self, path: str, *, resume_step: int = 0,
               tensorboard_dir: Optional[str] = None,
               primary: Optional[bool] = None):
    self.path = path
    self.primary = _primary(primary)
    self._tensorboard = None
    if not self.primary:
      return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
    with open(path, "w") as handle:
      for record in kept:
        handle.write(json.dumps(record) + "\n")
    if tensorboard_dir is not None:
      # The file name holds the time in whole seconds only: two writers started
      # within a second (a quick restart) would share it, and the second would
      # truncate the first's file. The nanosecond suffix keeps them apart and in
      # order (TensorBoard reads a directory's files in name order).
      # Imported here: jdeq.train works without tensorboardX until events are asked for.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tensorboard = tensorboardX.SummaryWriter(
          tensorboard_dir, purge_step=resume_step + 1 if resume_step else None,
          filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as handle:
      handle.write(json.dumps(to_json(record)) + "\n")
    kind, step = record.get("kind"), record.get("step")
    if self._tensorboard is None or kind not in TENSORBOARD_KINDS or step is None:
      return
    for name, value in record.items():
      if (name not in ("kind", "step") and isinstance(value, numbers.Real)
          and not isinstance(value, bool)):
        self._tensorboard.add_scalar(f"{kind}/{name}", float(value), int(step))
    self._tensorboard.flush()  # a killed run keeps every record it logged

  def close(self) -> None:
    """Closes the TensorBoard writer (the JSON lines need no closing)."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


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


def write_report(path: str, report: Mapping[str, Any], *,
                 primary: Optional[bool] = None) -> None:
  """Writes the final report atomically (temporary file, then rename).

  Only the primary process writes (``primary``: None asks the runtime); with
  several writers on one file system their renames would race.
  """
  if not _primary(primary):
    return
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    json.dump(to_json(report), handle, indent=2)
  os.replace(temporary, path)


def _series(records: Iterable[dict], kind: str, key: str):
  points = [(r["step"], r[key]) for r in records
            if r.get("kind") == kind and r.get(key) is not None]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict], directory: str, *,
                primary: Optional[bool] = None) -> list[str]:
  """Learning curves and solver statistics over training, as PNG files.

  Only the primary process draws (``primary``: None asks the runtime).

  Returns:
    The paths written: ``curves.png`` (train loss; train and test accuracy, or
    train and validation perplexity for a language model) and
    ``solver.png`` (forward NFE; mean and max relative residual, log scale); empty
    on the other processes.
  """
  if not _primary(primary):
    return []
  paths = []
  # A language model reports perplexity (log scale) where a classifier reports
  # accuracy, and is evaluated on its validation split.
  quality = ("perplexity" if any("perplexity" in r for r in records)
             else "accuracy")
  evaluated = "valid" if quality == "perplexity" else "test"
  figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
  loss_axis.plot(*_series(records, "train", "loss"), label="train")
  loss_axis.plot(*_series(records, "eval", "loss"), "o-", label=evaluated)
  loss_axis.set(xlabel="step", ylabel="cross-entropy", title="loss")
  accuracy_axis.plot(*_series(records, "train", quality), label="train")
  accuracy_axis.plot(*_series(records, "eval", quality), "o-", label=evaluated)
  accuracy_axis.set(xlabel="step", ylabel=quality, title=quality,
                    yscale="log" if quality == "perplexity" else "linear")
  for axis in (loss_axis, accuracy_axis):
    axis.legend()
    axis.grid(alpha=0.3)
  figure.tight_layout()
  paths.append(os.path.join(directory, "curves.png"))
  figure.savefig(paths[-1], dpi=100)
  plt.close(figure)

  figure, (nfe_axis, residual_axis) = plt.subplots(1, 2, figsize=(10, 4))
  nfe_axis.plot(*_series(records, "train", "fwd_nfe"), label="train")
  nfe_axis.plot(*_series(records, "eval", "fwd_nfe"), "o-", label=evaluated)
  nfe_axis.set(xlabel="step", ylabel="map evaluations", title="forward NFE")
  residual_axis.plot(*_series(records, "train", "residual"), label="train mean")
  residual_axis.plot(*_series(records, "train", "residual_max"), label="train max",
                     alpha=0.5)
  residual_axis.plot(*_series(records, "eval", "residual"), "o-",
                     label=f"{evaluated} mean")
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

"""Checkpoints of the train state with orbax, checked against the model on restore.

Atomicity comes from orbax's design: a checkpoint is written into a temporary
directory and only renamed to its final step directory (``<dir>/<step>``) once every
file is complete (the rename is atomic on a POSIX file system; on object stores
orbax writes a commit marker instead). A run killed mid-save therefore leaves either
the previous checkpoints or a temporary directory that orbax ignores and removes
(``cleanup_tmp_directories``), never a half-written step. ``CheckpointManager`` also
keeps only the last ``k`` steps (``max_to_keep``) and writes asynchronously, so the
training loop only waits for the device-to-host copy.

On disk a checkpoint has two items: ``state``, the train state as a nested dict of
arrays named by their pytree paths (``params/...``, ``opt_state/...``, PRNG keys as
their raw ``uint32`` data), and ``meta``, a JSON record (step, configuration).
Before restoring, the saved names, shapes and dtypes are compared with those the
current model expects, so restoring into a differently configured model is a
:class:`CheckpointError` that lists the differences instead of a deep orbax error.

Several processes (a multi-process job, :mod:`jdeq.train.distributed`) share one
checkpoint directory on a file system they all see, and every one of them calls
:meth:`Checkpointer.save` and :meth:`Checkpointer.restore` at the same steps:
orbax coordinates them with barriers, each process writes the shards of the arrays
on its own devices (replicated arrays once, by their first replica), and only
the primary process creates and renames the step directory, writes the ``meta``
item and deletes old steps. jdeq writes no file of its own here. The host-side
decisions that choose which collective comes next (is there a checkpoint, which
step, is this step saved already) are process 0's, broadcast, so that processes
whose view of the directory lags cannot diverge and wait on each other forever.
The arrays come back in the template's shardings, whatever the mesh that wrote
them: a checkpoint of a two-process job restores in one process and vice versa.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdeq.train import distributed
from jdeq.train.state import TrainState

_MAX_LISTED = 8


class CheckpointError(RuntimeError):
  """A checkpoint could not be read, or does not fit the model being trained."""


def _entry_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


_FIELDS = ("params", "model_state", "opt_state", "step", "rng", "carry")


def _named_leaves(state: TrainState) -> tuple[list[tuple[tuple[str, ...], Any]], dict]:
  """Leaves of the state keyed by path names (parameters first), and treedefs."""
  named, treedefs = [], {}
  for field in _FIELDS:
    paths_and_leaves, treedefs[field] = jax.tree_util.tree_flatten_with_path(
        getattr(state, field))
    named += [((field,) + tuple(_entry_name(entry) for entry in path), leaf)
              for path, leaf in paths_and_leaves]
  return named, treedefs


def _nest(named: list[tuple[tuple[str, ...], Any]]) -> dict:
  tree: dict = {}
  for path, leaf in named:
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = leaf
  return tree


def _flatten_metadata(tree: Any, prefix: tuple[str, ...] = ()) -> dict:
  if isinstance(tree, Mapping):
    out = {}
    for name, child in tree.items():
      out.update(_flatten_metadata(child, prefix + (str(name),)))
    return out
  return {prefix: tree}


def _storable(leaf: Any) -> Any:
  return jax.random.key_data(leaf) if _is_key(leaf) else leaf


class Checkpointer:
  """Saves and restores :class:`TrainState` under ``directory``, keeping the last k.

  Args:
    directory: checkpoint root; created if missing.
    keep_last_k: number of most recent checkpoints kept.
    asynchronous: write in a background thread (call :meth:`wait` or
      :meth:`close` before reading the files from another process).
  """

  def __init__(self, directory: str | os.PathLike, keep_last_k: int = 3, *,
               asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last_k, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=asynchronous)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except Exception as error:  # orbax raises various types for unreadable dirs
      raise CheckpointError(
          f"cannot open checkpoint directory {self.directory}: {error}") from error

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None if there is none.

    In a multi-process job this is a collective (every process calls it) and
    returns process 0's answer everywhere.
    """
    step = self._manager.latest_step()
    step = int(distributed.broadcast_from_primary(
        np.int32(-1 if step is None else step)))
    return None if step < 0 else step

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState, meta: Mapping[str, Any]) -> None:
    """Writes ``state`` at its own step (a no-op if that step already exists)."""
    step = int(jax.device_get(state.step))
    if bool(distributed.broadcast_from_primary(
        np.bool_(step in self._manager.all_steps()))):
      return
    named, _ = _named_leaves(state)
    tree = _nest([(path, _storable(leaf)) for path, leaf in named])
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        meta=ocp.args.JsonSave(dict(meta, step=step))))

  def restore(self, template: TrainState,
              step: Optional[int] = None) -> tuple[TrainState, dict]:
    """Restores the checkpoint at ``step`` (default: latest) into ``template``'s layout.

    ``template`` is a freshly created state of the model being trained; its
    structure, shapes, dtypes and shardings define what is expected.

    Raises:
      CheckpointError: no checkpoint, an unreadable (corrupt) one, or one whose
        arrays do not match the template; the message names the directory.
    """
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    where = f"checkpoint {self.directory} (step {step})"
    named, treedefs = _named_leaves(template)
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = _flatten_metadata(getattr(saved, "tree", saved))
    except Exception as error:
      raise CheckpointError(f"{where} is unreadable (corrupt or incomplete): "
                            f"{type(error).__name__}: {error}") from error
    self._check_compatible(where, named, saved)
    abstract = _nest([(path, ocp.utils.to_shape_dtype_struct(_storable(leaf)))
                      for path, leaf in named])
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as error:
      raise CheckpointError(f"{where} is unreadable (corrupt or incomplete): "
                            f"{type(error).__name__}: {error}") from error
    leaves = []
    for path, leaf in named:
      value = restored["state"]
      for part in path:
        value = value[part]
      if _is_key(leaf):
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
      leaves.append(value)
    fields, position = {}, 0
    for field in _FIELDS:
      count = treedefs[field].num_leaves
      fields[field] = jax.tree_util.tree_unflatten(
          treedefs[field], leaves[position:position + count])
      position += count
    return template.replace(**fields), dict(restored["meta"] or {})

  @staticmethod
  def _check_compatible(where: str, named, saved: Mapping[tuple, Any]) -> None:
    # The template's order lists parameters first, the most telling differences.
    expected = {path: _storable(leaf) for path, leaf in named}
    missing = [path for path in expected if path not in saved]
    unexpected = sorted(set(saved) - set(expected))
    different = []
    for path in (path for path in expected if path in saved):
      want, have = expected[path], saved[path]
      have_shape = tuple(getattr(have, "shape", ()) or ())
      have_dtype = getattr(have, "dtype", None)
      if (tuple(want.shape) != have_shape or
          (have_dtype is not None and np.dtype(want.dtype) != np.dtype(have_dtype))):
        different.append(f"{'/'.join(path)}: checkpoint {have_shape} {have_dtype}, "
                         f"model {tuple(want.shape)} {want.dtype}")
    if not (missing or unexpected or different):
      return
    lines = [f"{where} does not match the model (was it written with a "
             "different configuration?):"]
    for title, items in (("missing from the checkpoint",
                          ["/".join(p) for p in missing]),
                         ("not in the model", ["/".join(p) for p in unexpected]),
                         ("shape/dtype mismatch", different)):
      if items:
        shown = items[:_MAX_LISTED]
        more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
        lines.append(f"  {title}: " + "; ".join(shown) + more)
    raise CheckpointError("\n".join(lines))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

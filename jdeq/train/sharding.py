"""Data parallelism with ``jax.sharding``: one code path from one CPU to many hosts.

A 1-D :class:`jax.sharding.Mesh` with axis ``"data"`` spans the devices. Batches are
sharded along their leading axis (``PartitionSpec("data")``), the train state is
replicated (``PartitionSpec()``); the jitted steps declare these shardings and XLA
inserts the gradient all-reduce. With one device the mesh has one entry and the
very same code runs.

Multi-host (several processes, e.g. one per GPU node; :mod:`jdeq.train.distributed`):

1. call :func:`jdeq.train.distributed.initialize` (coordinator address, process
   count and id come from its arguments or the cluster environment) before
   anything else touches JAX;
2. build the mesh from ``jax.devices()``, which then lists the devices of every
   process (:func:`data_mesh` does this);
3. every process builds the same initial state, and :func:`replicate` checks that
   they agree before each contributes its devices' copies;
4. every process reads the same global batch order (``jdeq.data.train_batches`` is
   determined by seed and step) and keeps only its slice
   ``[process_index · B/P, (process_index + 1) · B/P)`` (:func:`process_rows`);
   :func:`shard_batch` assembles the global array from those slices with
   ``jax.make_array_from_process_local_data``;
5. checkpoints are written collectively: orbax coordinates the processes, so every
   process calls save/restore with the same step.

The global batch size must be divisible by the number of devices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdeq.train import distributed

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _global_replica(leaf: Any, sharding: NamedSharding) -> jax.Array:
  """A replicated global array from this process's copy of ``leaf``."""
  if _is_key(leaf):
    data = _global_replica(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  host = np.asarray(leaf)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``.

  With several processes each one supplies the copies on its own devices from its
  local ``tree`` (arrays committed to a local device cannot be moved onto another
  process's devices); the trees must therefore be equal on every process, which
  is checked (one digest per process, all-gathered).

  Raises:
    ValueError: in a multi-process mesh, the processes' trees differ.
  """
  sharding = replicated(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  distributed.assert_same_on_all_processes(tree, "the replicated state")
  return jax.tree.map(lambda leaf: _global_replica(leaf, sharding), tree)


def process_rows(mesh: Mesh, global_size: int) -> slice:
  """The rows of a global batch of ``global_size`` that this process feeds.

  They are the rows that :func:`batch_sharding` places on this process's devices
  of ``mesh``: ``[p·B/P, (p + 1)·B/P)`` for process ``p`` of ``P`` when each
  process's devices are adjacent in the mesh (as :func:`data_mesh` builds it from
  ``jax.devices()``), all rows in a single process.

  Raises:
    ValueError: this process's devices hold no rows or a non-contiguous set of
      rows (its devices are not adjacent in the mesh).
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  spans = sorted({index[0].indices(global_size)[:2] for index in indices.values()})
  if not spans:
    raise ValueError("this process has no devices in the data mesh")
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(
        f"the devices of process {jax.process_index()} hold rows {spans} of the "
        "batch, not one contiguous block: order the mesh's devices so that each "
        "process's devices are adjacent (as jax.devices() lists them)")
  return slice(start, stop)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns a global host batch into arrays sharded along the batch axis.

  Every process passes the same global batch (the data contract makes batch ``k``
  a function of ``k``) and contributes only its rows (:func:`process_rows`), so
  the same call is correct on one host and on many; each process reads the whole
  batch but copies only its slice to its devices.

  Raises:
    ValueError: a field's leading size is not divisible by the mesh's devices.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    global_size = value.shape[0]
    if global_size % mesh.size:
      raise ValueError(
          f"batch size {global_size} (field {name!r}) is not divisible by the "
          f"{mesh.size} devices of the data mesh")
    local_value = value[process_rows(mesh, global_size)]
    out[name] = jax.make_array_from_process_local_data(sharding, local_value,
                                                       value.shape)
  return out

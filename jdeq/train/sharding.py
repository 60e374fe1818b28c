"""Data parallelism with ``jax.sharding``: one code path from one CPU to many hosts.

A 1-D :class:`jax.sharding.Mesh` with axis ``"data"`` spans the devices. Batches are
sharded along their leading axis (``PartitionSpec("data")``), the train state is
replicated (``PartitionSpec()``); the jitted steps declare these shardings and XLA
inserts the gradient all-reduce. With one device the mesh has one entry and the
very same code runs.

Multi-host (several processes, e.g. one per GPU node):

1. call ``jax.distributed.initialize()`` (coordinator address, process count and
   id come from the cluster environment or its arguments) before anything else
   touches JAX;
2. build the mesh from ``jax.devices()``, which then lists the devices of every
   process (:func:`data_mesh` does this);
3. every process reads the same global batch order (``jdeq.data.train_batches`` is
   determined by seed and step) and keeps only its slice
   ``[process_index · B/P, (process_index + 1) · B/P)``; :func:`shard_batch`
   assembles the global array from those slices with
   ``jax.make_array_from_process_local_data``;
4. checkpoints are written collectively: orbax coordinates the processes, so every
   process calls save/restore with the same step.

The global batch size must be divisible by the number of devices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns a global host batch into arrays sharded along the batch axis.

  Each process contributes its contiguous slice of the global batch, so the same
  call is correct on one host and on many.
  """
  sharding = batch_sharding(mesh)
  process_count, process_index = jax.process_count(), jax.process_index()
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    global_size = value.shape[0]
    if global_size % mesh.size:
      raise ValueError(
          f"batch size {global_size} (field {name!r}) is not divisible by the "
          f"{mesh.size} devices of the data mesh")
    local = global_size // process_count
    local_value = value[process_index * local:(process_index + 1) * local]
    out[name] = jax.make_array_from_process_local_data(sharding, local_value,
                                                       value.shape)
  return out

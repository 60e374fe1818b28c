"""Multi-process runs: starting JAX's distributed runtime, and the primary process.

One training job may span several processes (one per host or per accelerator),
each running the same program on its own devices (JAX's multi-controller model).
:func:`initialize` connects them through JAX's coordination service and must run
before anything touches JAX's devices; from then on ``jax.devices()`` lists the
devices of every process, the data mesh spans them all
(:func:`jdeq.train.data_mesh`), each process feeds its slice of every global batch
(:func:`jdeq.train.shard_batch`), checkpoints are written collectively
(:class:`jdeq.train.Checkpointer`) and only the primary process (index 0) writes
logs, reports and plots and prints (:func:`is_primary`).

Where the coordinator address, the process count and this process's index come
from: the arguments of :func:`initialize`, or, for those left ``None``, the cluster
environment as ``jax.distributed.initialize`` detects it (SLURM, Open MPI, Cloud
TPU, or ``mpi4py``; plus ``JAX_COORDINATOR_ADDRESS``).

On CPU, collectives across processes (the gradient all-reduce) need a
cross-process implementation; :func:`initialize` selects gloo (TCP) unless the
environment chose one (``JAX_CPU_COLLECTIVES_IMPLEMENTATION``). Recent JAX
releases default to gloo already; where the option no longer exists the choice is
left to JAX.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

_CPU_COLLECTIVES_OPTION = "jax_cpu_collectives_implementation"
_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\s]+):(?P<port>\d+)$")


def _check_address(address: str) -> None:
  match = _ADDRESS.match(address)
  if match is None or not 0 < int(match.group("port")) < 65536:
    raise ValueError(f"coordinator address {address!r} is not of the form HOST:PORT "
                     "(e.g. 10.0.0.1:1234, with a port in 1..65535)")


def _check_arguments(coordinator: Optional[str], num_processes: Optional[int],
                     process_id: Optional[int]) -> None:
  if coordinator is not None:
    _check_address(coordinator)
  if num_processes is not None and (isinstance(num_processes, bool) or
                                    not isinstance(num_processes, int) or
                                    num_processes < 1):
    raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
  if process_id is not None and (isinstance(process_id, bool) or
                                 not isinstance(process_id, int) or process_id < 0):
    raise ValueError(f"process_id must be a non-negative integer, got {process_id!r}")
  if (num_processes is not None and process_id is not None
      and process_id >= num_processes):
    raise ValueError(f"process_id {process_id} is out of range for {num_processes} "
                     f"processes (valid: 0..{num_processes - 1})")


def use_cpu_collectives(implementation: str = "gloo") -> bool:
  """Selects the CPU cross-process collectives, unless the environment chose them.

  Returns:
    Whether the option was set here: False when ``JAX_CPU_COLLECTIVES_IMPLEMENTATION``
    is set (the user's choice stands) or this JAX has no such option (it then
    decides itself).
  """
  if os.environ.get(_CPU_COLLECTIVES_OPTION.upper()):
    return False
  try:
    jax.config.update(_CPU_COLLECTIVES_OPTION, implementation)
  except AttributeError:  # "Unrecognized config option": renamed or removed
    return False
  return True


def initialize(coordinator: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids: Optional[list[int]] = None,
               timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX job.

  Every process of the job calls it with the same ``coordinator`` and
  ``num_processes`` and its own ``process_id``; process 0 also hosts the
  coordination service at ``coordinator``. Arguments left ``None`` are taken from
  the cluster environment (SLURM, Open MPI, ...), so under ``srun`` or ``mpirun`` a
  bare ``initialize()`` suffices.

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordination service.
    num_processes: processes in the job.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    local_device_ids: restrict this process to these local accelerators (None:
      JAX's default for the environment).
    timeout_s: how long to wait for every process to connect.

  Raises:
    ValueError: a malformed address, a non-positive count, an index out of range,
      a non-positive timeout, or parameters that neither the arguments nor the
      environment provide.
    RuntimeError: JAX already ran a computation or listed its devices in this
      process (the runtime can only be joined before), or the job was already
      initialized.
  """
  _check_arguments(coordinator, num_processes, process_id)
  if timeout_s <= 0:
    raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
  if jax.distributed.is_initialized():
    raise RuntimeError("the distributed runtime is already initialized in this "
                       "process")
  use_cpu_collectives()
  try:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
  except ValueError as error:
    # JAX names the missing parameter; say where it could have come from.
    raise ValueError(
        f"cannot start the distributed runtime: {error}. Pass the coordinator "
        "address, process count and process id, or run under a cluster launcher "
        "JAX detects (SLURM srun, Open MPI mpirun)") from error


def is_initialized() -> bool:
  """Whether this process joined a distributed runtime (:func:`initialize`)."""
  return jax.distributed.is_initialized()


def process_index() -> int:
  """This process's index in the job (0 without a distributed runtime)."""
  return jax.process_index()


def process_count() -> int:
  """Processes in the job (1 without a distributed runtime)."""
  return jax.process_count()


def is_primary() -> bool:
  """True on process 0, the one that writes logs, reports and plots and prints.

  Like every query of JAX's devices, it starts JAX's runtime: in a distributed
  job call it after :func:`initialize`.
  """
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Blocks until every process has reached the barrier ``name`` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value: Any) -> Any:
  """Process 0's value of a pytree of numbers, on every process (as numpy).

  For host-side decisions every process must take alike (whether a checkpoint
  exists, which step to resume), so that all of them enter the same collectives.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, value)
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def primary_decides(flag: bool, *, sync_point: bool = True) -> bool:
  """Process 0's ``flag`` on every process, for decisions read off a local clock.

  A wall-clock budget is measured by each process on its own; if one stopped while
  the others trained on, they would wait forever in the next collective. Alone,
  ``flag`` is returned as it is. In a multi-process job process 0's value is
  broadcast, but only where ``sync_point`` is True (elsewhere the answer is False
  and nothing is exchanged): a broadcast is a host synchronization, so a loop asks
  only where it synchronizes anyway (its log steps).
  """
  if jax.process_count() == 1:
    return bool(flag)
  if not sync_point:
    return False
  return bool(broadcast_from_primary(np.asarray(bool(flag))))


def fingerprint(tree: Any) -> np.ndarray:
  """A 128-bit digest of the values, shapes and dtypes of ``tree``'s leaves.

  PRNG key leaves count by their raw key data. Leaves must be readable on this
  process (host values or fully addressable / replicated arrays).
  """
  digest = hashlib.blake2b(digest_size=16)
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    host = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{host.dtype.str}{host.shape}".encode())
    digest.update(host.tobytes())
  return np.frombuffer(digest.digest(), np.uint32).copy()


def assert_same_on_all_processes(tree: Any, what: str) -> None:
  """Checks that every process holds the same ``tree`` (one small all-gather).

  Raises:
    ValueError: naming ``what`` and the processes whose copy differs from process
      0's.
  """
  if jax.process_count() == 1:
    return
  digests = np.asarray(multihost_utils.process_allgather(fingerprint(tree)))
  differing = [index for index in range(digests.shape[0])
               if not np.array_equal(digests[index], digests[0])]
  if differing:
    raise ValueError(
        f"{what} differs between processes (processes {differing} differ from "
        "process 0): every process must build it from the same configuration and "
        "seed")

"""``python -m experiments.device_check.probe``: the JAX devices, as one JSON line.

Run in a process of its own, so that the process that orchestrates the check never
starts a JAX backend (on a GPU that would reserve most of the device's memory for
the whole check). Prints ``{"platform", "default_backend", "devices": [...],
"versions": {...}}``, each device with its id, platform, kind, process index and, where
the backend reports them, its allocator's ``bytes_limit`` and ``bytes_in_use``.
"""

from __future__ import annotations

import json
import sys


def describe_devices() -> dict:
  """The devices JAX sees and the versions of jax and jaxlib."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  devices = []
  for device in jax.devices():
    entry = {"id": device.id, "platform": device.platform,
             "device_kind": device.device_kind, "process_index": device.process_index}
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without the API)
      stats = {}
    for key in ("bytes_limit", "bytes_in_use"):
      entry[key] = int(stats[key]) if key in stats else None
    devices.append(entry)
  return {"platform": jax.devices()[0].platform, "default_backend": jax.default_backend(),
          "devices": devices,
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__}}


def main() -> int:
  from jdeq import ops  # pylint: disable=g-import-not-at-top
  ops.tune_cpu_runtime()  # as every entry point, before JAX's first computation
  print(json.dumps(describe_devices()), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

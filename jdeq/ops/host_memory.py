"""Keeping freed host memory in the process, for XLA:CPU's per-call temporaries.

Each call of a compiled XLA:CPU program allocates its temporary buffer (a jdeq
training step's solver histories, activations and cotangents; tens to hundreds of
MiB) and frees it when the call returns. glibc's malloc serves blocks that large
with a fresh ``mmap`` and gives them back with ``munmap``, so every call
page-faults its whole working memory in again, one zeroed 4 KiB page at a time.
glibc cannot keep blocks above 32 MiB on its heap by raising the ``mmap`` threshold
(that is its ceiling), so :func:`retain_freed_host_memory` switches ``mmap`` off for
malloc, stops the heap from being trimmed and keeps one arena, so a freed buffer is
reused by the next call (measured fault counts in ``docs/benchmarks.md``).

The setting changes where memory comes from, not what any program computes. Its
cost is that memory freed by the process stays mapped (at most the peak working
set). It is process-wide, so entry points call it once, before JAX starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int

#: The environment variables through which glibc applies the same settings to a
#: process it starts (a child process that cannot import jdeq, for instance).
RETAIN_FREED_MEMORY_ENVIRONMENT = {
    "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM),
    "MALLOC_ARENA_MAX": "1"}


def retain_freed_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of unmapping it.

  Returns:
    Whether the setting was applied: ``False`` off Linux or with a C library other
    than glibc, where nothing is changed.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success.
  return all(mallopt(option, value) == 1 for option, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_ARENA_MAX, 1)))

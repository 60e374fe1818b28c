"""jdeq.ops.retain_freed_host_memory: a freed large block is reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 64 MiB block twice; prints the minor page faults of
# the second round. Run in a fresh process: the setting is process-wide.
_PROBE = """
import ctypes, resource, sys
from jdeq.ops import host_memory
applied = host_memory.retain_freed_host_memory() if sys.argv[1] == "retain" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def touch_and_free():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode: str) -> tuple[str, int]:
  result = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=_ROOT, check=True,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=_ROOT))
  applied, faults = result.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  _, default_faults = _second_round_faults("default")
  applied, retained_faults = _second_round_faults("retain")
  assert applied == "True"
  # glibc's default unmaps the freed block, so every page faults in again (unless
  # transparent huge pages serve it, which this check then cannot see).
  if default_faults > pages // 2:
    assert retained_faults < pages // 20, (default_faults, retained_faults)
  else:
    assert retained_faults <= default_faults

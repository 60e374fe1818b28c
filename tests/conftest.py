import os
import pathlib

import jax
import pytest

from jdeq import ops

ops.tune_cpu_runtime()  # the suite runs on CPU, as the entry points do

# The suite is dominated by XLA compile time (each check compiles its own small
# programs and runs them a few times). LLVM's optimization level changes only how
# fast the generated code runs, not what it computes, and at level 0 the suite
# compiles ~2.5x faster. JDEQ_TEST_XLA_OPT_LEVEL overrides it (e.g. 2 to test the
# code that training runs).
_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}="
                             f"{os.environ.get('JDEQ_TEST_XLA_OPT_LEVEL', '0')}").strip()
# JDEQ_TEST_PLATFORM runs the suite on another JAX platform (e.g. "gpu", as
# experiments.device_check does on an accelerator); by default the CPU.
jax.config.update("jax_platforms", os.environ.get("JDEQ_TEST_PLATFORM", "cpu"))


@pytest.fixture
def x64():
  """Runs a test in float64 (the oracle precision of every gradient check)."""
  with jax.enable_x64(True):
    yield


def _find_test_data_dir() -> pathlib.Path | None:
  candidates = [os.environ.get("JDEQ_TEST_DATA_DIR"), os.environ.get("TFDS_DATA_DIR"),
                pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"]
  for candidate in candidates:
    if candidate and (pathlib.Path(candidate) / "cifar10").is_dir():
      return pathlib.Path(candidate)
  return None


@pytest.fixture(scope="session")
def tfds_data_dir() -> pathlib.Path:
  """The offline TFDS data dir with real CIFAR-10 and MNIST, or skip."""
  found = _find_test_data_dir()
  if found is None:
    pytest.skip("real TFDS data not found: set JDEQ_TEST_DATA_DIR or TFDS_DATA_DIR")
  return found

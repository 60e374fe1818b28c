import os
import pathlib

import jax
import pytest

import experiments

experiments.use_fast_cpu_convolutions()  # the suite runs on CPU; see the flag's docs
jax.config.update("jax_platforms", "cpu")


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

"""Entry points that compose the library: the training CLI, configs, paper scripts."""

import os

from jdeq.ops import CPU_CONVOLUTION_FLAG  # importing JAX does not start a backend


def use_fast_cpu_convolutions() -> None:
  """Adds :data:`CPU_CONVOLUTION_FLAG` to ``XLA_FLAGS`` unless that option is set.

  Must run before JAX starts its backend (the first computation); every training
  entry point calls it at import.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTION_FLAG}".strip()

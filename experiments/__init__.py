"""Entry points that compose the library: the training CLI, configs, paper scripts.

This package's own import must not import JAX: the benchmark's TorchDEQ worker
(``experiments.bench.torch_side``) runs in an environment without it.
"""

import os


def tune_cpu_runtime() -> None:
  """Adds :data:`jdeq.ops.CPU_CONVOLUTION_FLAG` to ``XLA_FLAGS`` unless that option
  is set, and keeps freed host memory for reuse
  (:func:`jdeq.ops.retain_freed_host_memory`).

  Must run before JAX starts its backend (the first computation); every training
  entry point calls it at import.
  """
  from jdeq import ops  # importing JAX does not start a backend

  ops.retain_freed_host_memory()
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {ops.CPU_CONVOLUTION_FLAG}".strip()

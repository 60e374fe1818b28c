"""Entry points that compose the library: the training CLI, configs, paper scripts.

This package's own import must not import JAX: the benchmark's TorchDEQ worker
(``experiments.bench.torch_side``) runs in an environment without it. Entry points
that train call :func:`jdeq.ops.tune_cpu_runtime` before JAX's first computation.
"""

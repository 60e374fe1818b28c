"""Array operations with derivatives tuned for equilibrium models (pure JAX), and
the process settings that make XLA:CPU run them fast."""

from jdeq.ops.conv import CPU_CONVOLUTION_FLAG, conv2d, conv_general_dilated
from jdeq.ops.host_memory import RETAIN_FREED_MEMORY_ENVIRONMENT, retain_freed_host_memory

__all__ = ("CPU_CONVOLUTION_FLAG", "RETAIN_FREED_MEMORY_ENVIRONMENT", "conv2d",
           "conv_general_dilated", "retain_freed_host_memory")

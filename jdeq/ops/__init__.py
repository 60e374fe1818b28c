"""Array operations with derivatives tuned for equilibrium models (pure JAX), and
the process settings that make XLA:CPU run them fast (:func:`tune_cpu_runtime`)."""

from jdeq.ops.conv import (CPU_WEIGHT_GRADIENTS, conv2d, conv_general_dilated,
                           cpu_weight_gradient, set_cpu_weight_gradient)
from jdeq.ops.host_memory import RETAIN_FREED_MEMORY_ENVIRONMENT, retain_freed_host_memory
from jdeq.ops.runtime import (CPU_CONVOLUTION_FLAG, match_weight_gradient_to_convolutions,
                              tune_cpu_runtime)

__all__ = ("CPU_CONVOLUTION_FLAG", "CPU_WEIGHT_GRADIENTS",
           "RETAIN_FREED_MEMORY_ENVIRONMENT", "conv2d", "conv_general_dilated",
           "cpu_weight_gradient", "match_weight_gradient_to_convolutions",
           "retain_freed_host_memory", "set_cpu_weight_gradient",
           "tune_cpu_runtime")

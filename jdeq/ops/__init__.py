"""Array operations with derivatives tuned for equilibrium models (pure JAX)."""

from jdeq.ops.conv import CPU_CONVOLUTION_FLAG, conv2d, conv_general_dilated

__all__ = ("CPU_CONVOLUTION_FLAG", "conv2d", "conv_general_dilated")

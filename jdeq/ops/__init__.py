"""Array operations with derivatives tuned for equilibrium models (pure JAX)."""

from jdeq.ops.conv import conv2d, conv_general_dilated

__all__ = ("conv2d", "conv_general_dilated")

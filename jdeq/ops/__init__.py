"""Array operations with derivatives tuned for equilibrium models (pure JAX)."""

from jdeq.ops.conv import conv2d

__all__ = ("conv2d",)

"""Reparameterizations of any Linear/Conv kernel: weight and spectral normalization.

Both wrap an existing layer (anything with a ``kernel`` Param whose last axis is the
output features: ``nnx.Linear``, ``nnx.Conv``, ``nnx.ConvTranspose`` …) and expose
the effective kernel through :meth:`weight`. In an equilibrium cell that kernel is
computed once per forward pass (in the cell's ``prepare`` hook) and handed back to
the layer at every solver iteration with ``layer(x, weight)``, so the normalization
is neither recomputed per iteration nor able to differ between iterations and the
backward pass; gradients reach the raw parameters through that one computation.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


def call_with_kernel(layer: nnx.Module, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Applies ``layer`` to ``x`` as if its ``kernel`` were ``kernel``.

  The layer itself is not modified: a functional copy with the substituted kernel
  is built and applied, so this works for any layer that reads ``self.kernel``.
  """
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda leaf: leaf, state)  # copy: never touch the layer's Variables
  state["kernel"] = nnx.Param(kernel)
  return nnx.merge(graphdef, state)(x)


def kernel_norm(kernel: jax.Array) -> jax.Array:
  """``‖v_o‖₂`` of every output channel ``o`` (the last axis) of a kernel."""
  return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1))))


class WeightNorm(nnx.Module):
  """Weight normalization (Salimans & Kingma, 2016) of any Linear/Conv.

  The effective kernel is ``w_o = g_o · v_o / ‖v_o‖₂`` for every output channel
  ``o``: the wrapped layer's own ``kernel`` Param becomes the direction ``v`` and a
  learned gain ``g`` (one per output channel) its norm. ``g`` is initialised to
  ``‖v_o‖``, so at initialisation ``w = v``.

  Attributes:
    layer: the wrapped layer; ``layer.kernel`` holds ``v``.
    gain: the Param ``g``, shape ``(out_features,)``.
  """

  def __init__(self, layer: nnx.Module):
    if not isinstance(getattr(layer, "kernel", None), nnx.Param):
      raise ValueError(f"WeightNorm needs a layer with a `kernel` Param (Linear, Conv, "
                       f"...), got {type(layer).__name__}")
    self.layer = layer
    self.gain = nnx.Param(kernel_norm(layer.kernel[...]))

  def weight(self) -> jax.Array:
    """The normalized kernel ``g · v / ‖v‖`` (differentiable in ``g`` and ``v``)."""
    v = self.layer.kernel[...]
    return v * (self.gain[...] / kernel_norm(v))

  def __call__(self, x: jax.Array, weight: Optional[jax.Array] = None) -> jax.Array:
    """Applies the layer with ``weight`` (default: computed now by :meth:`weight`)."""
    return call_with_kernel(self.layer, x, self.weight() if weight is None else weight)


class SpectralVector(nnx.Variable):
  """Persistent power-iteration vector of :class:`SpectralNorm` (not trained)."""


class SpectralNorm(nnx.Module):
  """Spectral normalization (Miyato et al., 2018) of any Linear/Conv.

  With the kernel reshaped to the matrix ``W`` of shape ``(fan_in, out)``, the
  effective kernel is ``W / σ(W)``, where ``σ(W) = aᵀ W u`` is the largest singular
  value estimated by power iteration (``a ← W u / ‖W u‖``, ``u ← Wᵀ a / ‖Wᵀ a‖``)
  from a persistent vector ``u``. ``u`` and ``a`` are held constant in the gradient,
  as usual. The vector is only updated when :meth:`weight` is called with
  ``update=True`` (training).

  Attributes:
    layer: the wrapped layer.
    vector: the :class:`SpectralVector` ``u``, shape ``(out_features,)``.
    power_iterations: power-iteration steps per update.
  """

  def __init__(self, layer: nnx.Module, *, power_iterations: int = 1,
               rngs: nnx.Rngs):
    if not isinstance(getattr(layer, "kernel", None), nnx.Param):
      raise ValueError(f"SpectralNorm needs a layer with a `kernel` Param (Linear, Conv, "
                       f"...), got {type(layer).__name__}")
    if not (isinstance(power_iterations, int) and power_iterations >= 1):
      raise ValueError(f"SpectralNorm: power_iterations must be an integer >= 1, got "
                       f"{power_iterations!r}")
    self.layer = layer
    self.power_iterations = power_iterations
    kernel = layer.kernel[...]
    u = jax.random.normal(rngs.params(), kernel.shape[-1:], kernel.dtype)
    self.vector = SpectralVector(u / jnp.linalg.norm(u))

  def _power_iteration(self, matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    u = self.vector[...].astype(matrix.dtype)
    a = None
    for _ in range(self.power_iterations):
      a = matrix @ u
      a = a / (jnp.linalg.norm(a) + 1e-12)
      u = matrix.T @ a
      u = u / (jnp.linalg.norm(u) + 1e-12)
    return jax.lax.stop_gradient(a), jax.lax.stop_gradient(u)

  def weight(self, *, update: bool = False) -> jax.Array:
    """The kernel divided by its estimated spectral norm.

    Args:
      update: store the advanced power-iteration vector (do this once per training
        forward pass, outside any solver loop).
    """
    kernel = self.layer.kernel[...]
    matrix = kernel.reshape(-1, kernel.shape[-1])
    a, u = self._power_iteration(jax.lax.stop_gradient(matrix))
    if update:
      self.vector[...] = u
    sigma = a @ matrix @ u
    return kernel / sigma

  def __call__(self, x: jax.Array, weight: Optional[jax.Array] = None) -> jax.Array:
    """Applies the layer with ``weight`` (default: computed now, without update)."""
    return call_with_kernel(self.layer, x, self.weight() if weight is None else weight)


def effective_weight(layer: nnx.Module, *, train: bool = False) -> Optional[jax.Array]:
  """The kernel a (possibly normalized) layer should use for one forward pass.

  For :class:`WeightNorm` and :class:`SpectralNorm` this is their normalized kernel
  (advancing the spectral power iteration when ``train``); for a plain layer it is
  None, meaning "use your own parameters". Pair it with :func:`apply_layer`.
  """
  if isinstance(layer, WeightNorm):
    return layer.weight()
  if isinstance(layer, SpectralNorm):
    return layer.weight(update=train)
  return None


def apply_layer(layer: nnx.Module, x: jax.Array, weight: Optional[jax.Array]) -> jax.Array:
  """Applies ``layer`` with a kernel from :func:`effective_weight` (None: its own)."""
  if weight is None:
    return layer(x)
  return layer(x, weight)

"""2-D convolution whose weight gradient is one matrix product.

XLA's CPU backend computes the weight gradient of a convolution (the
"backprop-filter" convolution) an order of magnitude slower than the forward
convolution: measured on a 2-core x86 CPU for a 3×3, 24→120-channel convolution on
64×32×32 inputs, about 2 GFLOP/s against 35 GFLOP/s forward. Written as
``patches(x)ᵀ · dy``, the same gradient runs at the speed of a plain matrix product
(about 17 GFLOP/s on the same machine).

:func:`conv2d` is a ``jax.custom_jvp`` whose tangent in the weights is the im2col
product ``patches(x) · vec(ẇ)``; JAX transposes that into the fast matrix product for
reverse mode, while the tangent in the input stays a convolution (transposed by XLA's
fast input-gradient path). The weight tangent is checkpointed: reverse mode keeps
``x`` from the forward pass and builds its ``kh·kw`` times larger patches only in the
backward pass (measured on W2 of ``experiments/bench``: an unrolled 20-step training
step 35% faster, its temporary memory 482 → 142 MiB; IFT unchanged). Being a
custom_jvp rather than a custom_vjp, it keeps forward mode (``jax.jvp``,
``jax.linearize``), which implicit differentiation of an equilibrium relies on.
Weight tangents that are symbolically zero (linearizing in the state only, as every
solver iteration does) cost nothing.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, Sequence[tuple[int, int]]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(size: int, kernel: int, stride: int, padding) -> tuple[int, int]:
  if padding == "VALID":
    return 0, 0
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pads(x_shape, w_shape, strides, padding):
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"conv2d: padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
    return tuple(_explicit_padding(x_shape[1 + i], w_shape[i], strides[i], padding)
                 for i in range(2))
  return tuple(tuple(p) for p in padding)


def _patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
             pads) -> jax.Array:
  """``(N, H', W', kh·kw·C)`` patches ordered (kh, kw, C), like an HWIO kernel."""
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (padded.shape[1] - kernel[0]) // strides[0] + 1
  out_w = (padded.shape[2] - kernel[1]) // strides[1] + 1
  slices = [padded[:, i:i + strides[0] * (out_h - 1) + 1:strides[0],
                   j:j + strides[1] * (out_w - 1) + 1:strides[1], :]
            for i in range(kernel[0]) for j in range(kernel[1])]
  return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _weight_tangent(x, w_dot, strides, pads):
  """``conv(x, ẇ)`` as the im2col product ``patches(x) · vec(ẇ)``."""
  patches = _patches(x, w_dot.shape[:2], strides, pads)
  return patches @ w_dot.reshape(-1, w_dot.shape[-1])


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = "SAME") -> jax.Array:
  """NHWC × HWIO convolution, ``lax.conv_general_dilated`` with a fast weight gradient.

  Args:
    x: ``(N, H, W, C)`` input.
    w: ``(kh, kw, C, O)`` kernel.
    strides: spatial strides.
    padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), (lo, hi))``.

  Returns:
    ``(N, H', W', O)``.
  """
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"conv2d: expects NHWC input and HWIO kernel, got shapes "
                     f"{x.shape} and {w.shape}")
  if x.shape[-1] != w.shape[2]:
    raise ValueError(f"conv2d: input has {x.shape[-1]} channels, kernel expects "
                     f"{w.shape[2]}")
  strides = tuple(int(s) for s in strides)
  pads = _pads(x.shape, w.shape, strides, padding)
  return _conv(strides, pads, x, w)


def _lax_conv(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads,
                                      dimension_numbers=_DIMENSIONS)


@jax.custom_jvp
def _conv(strides, pads, x, w):
  return _lax_conv(x, w, strides, pads)


def _input_adjoint(cotangent, *, w, input_shape, strides, pads):
  """The adjoint of ``x ↦ conv(x, w)`` as a forward convolution (flipped kernel)."""
  flipped = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
  padding = []
  for axis in range(2):
    kernel, stride, (low, _) = w.shape[axis], strides[axis], pads[axis]
    out_size = cotangent.shape[1 + axis]
    before = kernel - 1 - low
    after = input_shape[1 + axis] + kernel - 1 - ((out_size - 1) * stride + 1) - before
    padding.append((before, after))
  return jax.lax.conv_general_dilated(cotangent, flipped, (1, 1), padding,
                                      lhs_dilation=strides,
                                      dimension_numbers=_DIMENSIONS)


def _conv_jvp(strides, pads, primals, tangents):
  x, w = primals
  x_dot, w_dot = tangents
  out = _lax_conv(x, w, strides, pads)
  tangent = None
  if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
    # Written as the transpose of the explicit adjoint convolution, so that JAX's
    # reverse mode transposes it back into that adjoint: a forward convolution with
    # the flipped HWIO kernel. JAX's own transpose rule yields a convolution with
    # swapped kernel dimensions, which XLA's CPU backend runs ~40x slower inside
    # loops (solver and scan bodies), where it does not re-layout the kernel.
    adjoint = functools.partial(_input_adjoint, w=w, input_shape=x.shape,
                                strides=strides, pads=pads)
    (tangent,) = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(
        out.shape, out.dtype))(x_dot)
  if not isinstance(w_dot, jax.custom_derivatives.SymbolicZero):
    # Checkpointed, so that reverse mode keeps x (not its kh·kw times larger
    # patches) from the forward pass and builds the patches in the backward pass,
    # right before the one matrix product that needs them: unrolled and phantom
    # gradients differentiate many map evaluations, each of which would otherwise
    # write and keep its patches.
    from_weights = _weight_tangent(x, w_dot, strides, pads)
    tangent = from_weights if tangent is None else tangent + from_weights
  if tangent is None:
    tangent = jnp.zeros_like(out)
  return out, tangent


_conv = jax.custom_jvp(_conv.fun, nondiff_argnums=(0, 1))
_conv.defjvp(_conv_jvp, symbolic_zeros=True)


_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """Drop-in for ``lax.conv_general_dilated`` (e.g. ``nnx.Conv(conv_general_dilated=...)``).

  Plain 2-D NHWC/HWIO convolutions (no dilation, one feature group) take
  :func:`conv2d`; everything else falls through to ``lax.conv_general_dilated``.
  """
  plain = (
      getattr(lhs, "ndim", 0) == 4
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1
      and precision is None
      and kwargs.get("preferred_element_type") is None
      and kwargs.get("out_sharding") is None
      and _is_nhwc_hwio(dimension_numbers, lhs.ndim))
  if plain:
    return conv2d(lhs, rhs, window_strides, padding)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, precision=precision, **kwargs)


def _is_nhwc_hwio(dimension_numbers, ndim) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, tuple) and all(isinstance(d, str)
                                                  for d in dimension_numbers):
    return tuple(dimension_numbers) == _DIMENSIONS
  numbers = jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  return tuple(map(tuple, numbers)) == tuple(map(tuple, _NHWC_HWIO))

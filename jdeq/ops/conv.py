"""2-D convolution with fast gradients on XLA's CPU backend.

Two of the convolutions that reverse mode derives from a forward convolution are
slow on XLA:CPU, depending on which library runs its convolutions:

* the input adjoint, as JAX's transpose rule writes it (a convolution with swapped
  kernel dimensions), runs ~40x slower inside loops (solver and scan bodies), where
  XLA does not re-layout the kernel. :func:`conv2d` writes it as a forward
  convolution with the flipped HWIO kernel, on every backend. For a strided
  convolution that adjoint would convolve the zero-dilated cotangent, which XLA:CPU
  runs ~5x slower than the forward convolution (3×3, stride 2, 24 channels, 64×32×32
  inputs); there it is written as one unit-stride convolution per stride phase
  (:func:`_strided_input_adjoint`), as fast as the forward one.
* the weight gradient ("backprop-filter" convolution). With YNNPACK's
  convolutions (XLA:CPU's default) it runs at ~2 GFLOP/s against 35 GFLOP/s
  forward (3×3, 24→120 channels, 64×32×32 inputs, 2-core x86); there the weight
  tangent is the im2col product ``patches(x) · vec(ẇ)``, which JAX transposes into
  one matrix product (~17 GFLOP/s). With XLA's own (Eigen) convolutions
  (:data:`CPU_CONVOLUTION_FLAG`, which every jdeq entry point sets) the native form is fast at the top level of a program
  but 25–70x slower than im2col inside loops; there the gradient is written as a forward
  convolution of the transposed input by the cotangent (:func:`_weight_adjoint`),
  fast in both places (benchmark W2 steps: IFT 9%, phantom 14%, unrolled 29%
  faster than im2col; MDEQ-Tiny's unrolled step 12% faster, its IFT step
  unchanged). On accelerators the native form is used.

The im2col weight tangent is checkpointed: reverse mode keeps ``x`` from the forward
pass and builds its ``kh·kw`` times larger patches only in the backward pass
(unrolled and phantom gradients differentiate many map evaluations, each of which
would otherwise write and keep its patches). Being a custom_jvp rather than a
custom_vjp, :func:`conv2d` keeps forward mode (``jax.jvp``, ``jax.linearize``),
which implicit differentiation of an equilibrium relies on. Weight tangents that are
symbolically zero (linearizing in the state only, as every solver iteration does)
cost nothing.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, Sequence[tuple[int, int]]]

#: The XLA_FLAGS option that makes XLA:CPU run convolutions with its own (Eigen)
#: kernels instead of YNNPACK's. Eigen's are as fast on one core and, unlike
#: YNNPACK's, keep every core busy: on a 2-core CPU, MDEQ-Tiny training steps run
#: 25–35% faster and evaluation passes 35% faster with them (``experiments/bench``
#: measures W2/W3 both ways). Only the CPU backend reads it, when it starts.
_YNN_WITHOUT_CONVOLUTIONS = "-individual_convolution"
CPU_CONVOLUTION_FLAG = f"--xla_cpu_experimental_ynn_fusion_type={_YNN_WITHOUT_CONVOLUTIONS}"
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


def _weight_adjoint(cotangent, *, x, kernel, strides, pads):
  """The adjoint of ``ẇ ↦ conv(x, ẇ)`` as a forward NHWC/HWIO convolution.

  ``∂w[i, j, c, o] = Σ_{n,h,w} x_pad[n, s·h + i, s·w + j, c] · ∂y[n, h, w, o]``: a
  convolution of ``x`` with the samples as input features and the channels as the
  batch (``(C, H, W, N)``) by the cotangent as a ``(H', W', N, O)`` kernel, dilated
  by the stride. The barrier keeps XLA from folding the transpose of ``x`` back
  into the dimension numbers, which would restore the slow backprop-filter form.
  """
  lhs = jax.lax.optimization_barrier(jnp.transpose(x, (3, 1, 2, 0)))
  rhs = jnp.transpose(cotangent, (1, 2, 0, 3))
  out = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), pads, rhs_dilation=strides,
                                     dimension_numbers=_DIMENSIONS)
  return jnp.transpose(out[:, :kernel[0], :kernel[1], :], (1, 2, 0, 3))


def _weight_tangent_by_forward_conv(x, w_dot, strides, pads):
  """``conv(x, ẇ)`` written as the transpose of :func:`_weight_adjoint`."""
  out_shape = jax.eval_shape(lambda: _lax_conv(x, w_dot, strides, pads))
  adjoint = functools.partial(_weight_adjoint, x=x, kernel=w_dot.shape[:2],
                              strides=strides, pads=pads)
  (tangent,) = jax.linear_transpose(adjoint, out_shape)(w_dot)
  return tangent


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
  """The adjoint of ``x ↦ conv(x, w)`` as forward convolutions (flipped kernel)."""
  if strides != (1, 1) and _strided_adjoint_by_phase():
    return _strided_input_adjoint(cotangent, w=w, input_shape=input_shape,
                                  strides=strides, pads=pads)
  padding = []
  for axis in range(2):
    kernel, stride = w.shape[axis], strides[axis]
    before = kernel - 1 - pads[axis][0]
    dilated = (cotangent.shape[1 + axis] - 1) * stride + 1
    padding.append((before, input_shape[1 + axis] + kernel - 1 - dilated - before))
  return jax.lax.conv_general_dilated(cotangent, _flipped_transposed(w), (1, 1), padding,
                                      lhs_dilation=strides, dimension_numbers=_DIMENSIONS)


def _strided_adjoint_by_phase() -> bool:
  """Whether a strided convolution's input adjoint runs by stride phase (XLA:CPU).

  Elsewhere the zero-dilated form stays: cuDNN runs it as its own backward-data
  convolution. Read at trace time; the choice changes speed only, never the result.
  """
  return jax.default_backend() == "cpu"


def _flipped_transposed(w):
  """The HWIO kernel of the adjoint convolution: spatially flipped, ``I`` and ``O`` swapped."""
  return jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)


def _strided_input_adjoint(cotangent, *, w, input_shape, strides, pads):
  """The adjoint of a strided ``x ↦ conv(x, w)`` as ``s_h·s_w`` unit-stride convolutions.

  Along one axis with stride ``s``, ``y[a] = Σ_i x_pad[s·a + i] w[i]``, so the
  input position ``t = s·q + r`` receives ``x̄_pad[s·q + r] = Σ_m ȳ[q − m] w[r + s·m]``:
  for each phase ``r`` a unit-stride "full" convolution of ``ȳ`` with the flipped
  sub-kernel ``w[r::s]``. The phases are interleaved and the padding is cut off.
  One convolution of the zero-dilated cotangent (``lhs_dilation``) would multiply
  ``s_h·s_w`` times more zeros than values; this does the forward convolution's work.
  """
  batch, channels = cotangent.shape[0], w.shape[2]
  extent = [pads[axis][0] + input_shape[1 + axis] for axis in range(2)]  # of x_pad
  quotient = [-(-extent[axis] // strides[axis]) for axis in range(2)]
  used = cotangent[:, :quotient[0], :quotient[1], :]
  phases = []
  for row_phase in range(strides[0]):
    row = []
    for col_phase in range(strides[1]):
      sub = w[row_phase::strides[0], col_phase::strides[1]]
      if sub.shape[0] == 0 or sub.shape[1] == 0:  # a kernel smaller than the stride
        row.append(jnp.zeros((batch, *quotient, channels), cotangent.dtype))
        continue
      padding = [(sub.shape[axis] - 1, quotient[axis] - used.shape[1 + axis])
                 for axis in range(2)]
      row.append(jax.lax.conv_general_dilated(used, _flipped_transposed(sub), (1, 1),
                                              padding, dimension_numbers=_DIMENSIONS))
    phases.append(jnp.stack(row, axis=3))  # (N, Q_h, Q_w, s_w, C)
  interleaved = jnp.stack(phases, axis=2).reshape(  # (N, Q_h, s_h, Q_w, s_w, C) →
      batch, quotient[0] * strides[0], quotient[1] * strides[1], channels)
  return interleaved[:, pads[0][0]:extent[0], pads[1][0]:extent[1], :]


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
    from_weights = _WEIGHT_TANGENTS[_weight_gradient_kind()](x, w_dot, strides, pads)
    tangent = from_weights if tangent is None else tangent + from_weights
  if tangent is None:
    tangent = jnp.zeros_like(out)
  return out, tangent


def _weight_gradient_kind() -> str:
  """Which weight-gradient form is fastest here (see the module docstring).

  Read at trace time; the choice changes speed only, never the result.
  """
  if jax.default_backend() != "cpu":
    return "native"
  if _YNN_WITHOUT_CONVOLUTIONS in os.environ.get("XLA_FLAGS", ""):
    return "forward_conv"  # XLA's own (Eigen) convolutions
  return "im2col"  # YNNPACK's convolutions, XLA:CPU's default


_WEIGHT_TANGENTS = {
    "native": lambda x, w_dot, strides, pads: _lax_conv(x, w_dot, strides, pads),
    "forward_conv": _weight_tangent_by_forward_conv,
    "im2col": _weight_tangent,
}


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

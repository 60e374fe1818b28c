"""2-D convolution whose derivatives run fast on XLA's CPU backend.

:func:`conv2d` is ``lax.conv_general_dilated`` on NHWC inputs and HWIO kernels with
a custom JVP that writes each derivative in a form XLA:CPU runs well inside loops
(solver and scan bodies); the values are exactly lax's. Reverse mode derives two
convolutions from a forward one:

* the input adjoint, which JAX's transpose rule writes as a convolution with swapped
  kernel dimensions (XLA:CPU does not re-layout the kernel inside loops). Here it is
  a forward convolution with the spatially flipped HWIO kernel, on every backend. For
  a strided convolution that would convolve the zero-dilated cotangent, ``s_h·s_w``
  times more zeros than values; on XLA:CPU it is written as one unit-stride
  convolution per stride phase instead (:func:`_strided_input_adjoint`), while
  accelerators keep the dilated form, which cuDNN runs as its own backward-data
  convolution.
* the weight gradient. Its form on XLA:CPU is a setting
  (:func:`set_cpu_weight_gradient`), because the fastest one depends on which library
  runs the process's convolutions: ``"im2col"``, the tangent
  ``patches(x) · vec(ẇ)`` that JAX transposes into one matrix product (for YNNPACK's
  convolutions, XLA:CPU's default); ``"forward_conv"``, a forward convolution of the
  transposed input by the cotangent (:func:`_weight_adjoint`; for XLA's own
  convolutions, which :func:`jdeq.ops.tune_cpu_runtime` selects and pairs with this
  form); or ``"native"``, lax's backprop-filter convolution, which accelerators
  always use.

On XLA:CPU a unit-stride convolution with a narrow output (input channels at least
four times the output's; the forward pass or the input adjoint) is computed as one
matrix product and a shifted sum (:func:`_conv_by_matmul`): XLA's own kernels run
such shapes at a fraction of their speed for wide outputs.

All these choices are made when a convolution is traced, for the backend being traced
for; :func:`set_derivative_platform` makes them as for another platform (tests on a
CPU check the forms an accelerator takes that way).

The im2col weight tangent is checkpointed: reverse mode keeps ``x`` from the forward
pass and builds its ``kh·kw`` times larger patches only in the backward pass
(unrolled and phantom gradients differentiate many map evaluations, each of which
would otherwise write and keep its patches). Being a custom_jvp rather than a
custom_vjp, :func:`conv2d` keeps forward mode (``jax.jvp``, ``jax.linearize``),
which implicit differentiation of an equilibrium relies on. Weight tangents that are
symbolically zero (linearizing in the state only, as every solver iteration does)
cost nothing. Measured speeds of every form are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, Sequence[tuple[int, int]]]

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

#: The weight-gradient forms :func:`set_cpu_weight_gradient` accepts.
CPU_WEIGHT_GRADIENTS = ("im2col", "forward_conv", "native")
_cpu_weight_gradient = "im2col"  # matches XLA:CPU's default (YNNPACK) convolutions


def set_cpu_weight_gradient(form: str) -> None:
  """Chooses the form of :func:`conv2d`'s weight gradient on XLA:CPU.

  A process-wide setting read when a convolution is traced (set it before jitting);
  it changes speed only, never results. Accelerators always use ``"native"``.

  Args:
    form: ``"im2col"`` (the default; for YNNPACK's convolutions),
      ``"forward_conv"`` (for XLA's own convolutions, see
      :func:`jdeq.ops.tune_cpu_runtime`) or ``"native"`` (lax's own form).
  """
  global _cpu_weight_gradient
  if form not in CPU_WEIGHT_GRADIENTS:
    raise ValueError(f"set_cpu_weight_gradient: form must be one of "
                     f"{list(CPU_WEIGHT_GRADIENTS)}, got {form!r}")
  _cpu_weight_gradient = form


def cpu_weight_gradient() -> str:
  """The weight-gradient form :func:`conv2d` uses on XLA:CPU."""
  return _cpu_weight_gradient


#: The platforms :func:`set_derivative_platform` accepts (JAX's backend names).
DERIVATIVE_PLATFORMS = ("cpu", "gpu", "tpu")
_derivative_platform_override: str | None = None  # None: the backend traced for


def set_derivative_platform(platform: str | None) -> None:
  """Makes :func:`conv2d` choose its derivative forms as if tracing for ``platform``.

  The forms are chosen when a convolution is traced, by default for
  ``jax.default_backend()``: on ``"cpu"`` the stride-phase input adjoint and the
  :func:`set_cpu_weight_gradient` form, elsewhere the zero-dilated input adjoint and
  lax's native weight gradient. A process-wide setting (set it before jitting); it
  changes speed only, never results. Its use is to run the accelerator forms on a
  CPU, where the test suite checks them against lax.

  Args:
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; None restores the default.
  """
  global _derivative_platform_override
  if platform is not None and platform not in DERIVATIVE_PLATFORMS:
    raise ValueError(f"set_derivative_platform: platform must be None or one of "
                     f"{list(DERIVATIVE_PLATFORMS)}, got {platform!r}")
  _derivative_platform_override = platform


def derivative_platform() -> str:
  """The platform :func:`conv2d` chooses its derivative forms for, now."""
  return _derivative_platform_override or jax.default_backend()


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
  if tuple(strides) == (1, 1):
    return _unit_stride_conv(x, w, pads)
  return jax.lax.conv_general_dilated(x, w, strides, pads,
                                      dimension_numbers=_DIMENSIONS)


# On XLA:CPU a unit-stride convolution whose input has at least this many times its
# output's channels runs as one matrix product and a shifted sum.
_NARROW_OUTPUT_RATIO = 4
_narrow_output_by_matmul = True  # a switch for paired timings of the two forms


def _unit_stride_conv(x, w, pads):
  """``lax.conv_general_dilated`` with unit strides, in the form that suits the backend.

  XLA:CPU's own convolution kernels run a narrow output (``120 → 24`` channels, the
  second convolution of an MDEQ residual block and the input adjoint of its first)
  at a fraction of their speed for wide ones; there it is :func:`_conv_by_matmul`.
  """
  kh, kw, channels, outputs = w.shape
  if (_narrow_output_by_matmul and derivative_platform() == "cpu" and kh * kw > 1
      and channels >= _NARROW_OUTPUT_RATIO * outputs):
    return _conv_by_matmul(x, w, pads)
  return jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_DIMENSIONS)


def _conv_by_matmul(x, w, pads):
  """A unit-stride convolution as one matrix product and a shifted sum.

  With ``y[n, h, w, i, j, o] = Σ_c x[n, h, w, c] · w[i, j, c, o]`` (one
  ``(N·H·W, C) × (C, kh·kw·O)`` product), the convolution is
  ``out[n, h, w, o] = Σ_{i,j} y_pad[n, h + i, w + j, i, j, o]``: the padding moves
  from ``x`` to ``y``. Values equal lax's up to the order of the sums.
  """
  n, height, width, channels = x.shape
  kh, kw, _, outputs = w.shape
  y = jnp.dot(x.reshape(-1, channels),
              jnp.transpose(w, (2, 0, 1, 3)).reshape(channels, kh * kw * outputs))
  y = y.reshape(n, height, width, kh, kw, outputs)
  zero = jnp.zeros((), y.dtype)
  padded = jax.lax.pad(y, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0),
                                 (0, 0, 0), (0, 0, 0)))
  out_h, out_w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
  terms = [padded[:, i:i + out_h, j:j + out_w, i, j, :]
           for i in range(kh) for j in range(kw)]
  return functools.reduce(jnp.add, terms)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
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
  if strides == (1, 1):
    return _unit_stride_conv(cotangent, _flipped_transposed(w), padding)
  return jax.lax.conv_general_dilated(cotangent, _flipped_transposed(w), (1, 1), padding,
                                      lhs_dilation=strides, dimension_numbers=_DIMENSIONS)


def _strided_adjoint_by_phase() -> bool:
  """Whether a strided convolution's input adjoint runs by stride phase (XLA:CPU).

  Elsewhere the zero-dilated form stays: cuDNN runs it as its own backward-data
  convolution. Read at trace time; the choice changes speed only, never the result.
  """
  return derivative_platform() == "cpu"


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
      row.append(_unit_stride_conv(used, _flipped_transposed(sub), padding))
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
    # the flipped HWIO kernel (not JAX's swapped-kernel-dimensions form).
    adjoint = functools.partial(_input_adjoint, w=w, input_shape=x.shape,
                                strides=strides, pads=pads)
    (tangent,) = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(
        out.shape, out.dtype))(x_dot)
  if not isinstance(w_dot, jax.custom_derivatives.SymbolicZero):
    from_weights = _WEIGHT_TANGENTS[_weight_gradient_form()](x, w_dot, strides, pads)
    tangent = from_weights if tangent is None else tangent + from_weights
  if tangent is None:
    tangent = jnp.zeros_like(out)
  return out, tangent


def _weight_gradient_form() -> str:
  """The weight-gradient form for the backend being traced for (see the module
  docstring): the :func:`set_cpu_weight_gradient` setting on XLA:CPU, else native."""
  return _cpu_weight_gradient if derivative_platform() == "cpu" else "native"


_WEIGHT_TANGENTS = {
    "native": lambda x, w_dot, strides, pads: _lax_conv(x, w_dot, strides, pads),
    "forward_conv": _weight_tangent_by_forward_conv,
    "im2col": _weight_tangent,
}

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

"""Linear operators with a certified spectral norm, and resolution changes.

The hidden objectives of :mod:`jdeq.models.optimization` are convex only while the
operators inside them are norm-bounded (``‖W‖₂ < 1``). Instead of estimating the
norm by power iteration (a lower bound, which can let ``‖W‖₂`` creep past 1), the
state-mixing convolutions here are *circular*: a circular convolution on an
``H×W`` grid is block-diagonalized by the 2-D DFT,

  DFT(W z)(ω) = ẑ(ω) K̂(ω),   K̂(ω) = Σ_t exp(2πi ⟨ω, t⟩ / (H, W)) K_t

(``ẑ(ω)`` the row vector of the channels' DFTs, ``t`` the tap offsets from the kernel
centre), so its spectral norm is exact, ``‖W‖₂ = max_ω σ_max(K̂(ω))``, a maximum over
``H·W`` small ``C_in × C_out`` matrices (Sedghi, Gupta & Long, 2019). Each operator
is parameterized as a spectral weight normalization

  W = c · sigmoid(g) · V / b(V),   ‖V‖₂ ≤ b(V),

with a free kernel ``V``, one learnable gain ``g`` and a certified upper bound
``b(V)`` (:func:`circular_conv_norm`), so ``‖W‖₂ ≤ c·sigmoid(g) < c`` holds for every
parameter value.

Cost. The same diagonalization makes the operators cheap to *apply*: inside the
solver loops the cells never convolve, they multiply the state's real FFT
(``H × (W/2 + 1)`` frequencies; the others are complex conjugates) by the symbol
frequency by frequency (:func:`spectral_product`), and ``WᵀW`` is the single matrix
``K̂(ω)K̂(ω)ᴴ`` per frequency (:func:`spectral_gram`). This is the same linear map
as :func:`circular_conv` (tested against it) at about a fifth of the flops of two
3×3 convolutions, and its derivatives are FFTs and matrix products again, where the
derivatives of a convolution are slow on CPU, above all inside loops.
:func:`circular_conv` remains the spatial definition (the objectives' values and
the tests use it); it is computed with :func:`jdeq.ops.conv2d`, whose derivatives
avoid those slow paths as well.

Norm certificate. ``b(V)`` is a trace bound on the largest eigenvalue of the
per-frequency Gram matrices, by repeated squaring (:func:`circular_conv_norm`),
computed once per forward pass outside the solver loops, on the ``H × (W/2 + 1)``
real-FFT frequencies only (``K̂(−ω)`` is the complex conjugate of ``K̂(ω)``, so the
maximum over them is the maximum over the whole grid). Its gradient is that of the
maximizing frequency alone — the exact gradient of a maximum wherever it is
attained once — so the differentiated part is one small matrix, not the whole grid.
We keep this certificate rather than a warm-started power iteration because power
iteration *under*-estimates the norm (the bound ``‖W‖₂ < c`` would then be
violated by the estimation error), and rather than a cruder closed-form bound
(the sum of the taps' norms is ≈ 2.8× the norm of a random 3×3, 32-channel kernel)
because it would cap the attainable norm well below ``c``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdeq import ops as jdeq_ops
from jdeq.nn import nearest_upsample


def circular_conv(z: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 circular ("wrap") convolution, NHWC input, HWIO odd-sized kernel."""
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(z, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)),
                   mode="wrap")
  return jdeq_ops.conv2d(padded, kernel.astype(z.dtype), padding="VALID")


def circular_conv_transpose(y: jax.Array, kernel: jax.Array) -> jax.Array:
  """The adjoint of :func:`circular_conv`: correlation with the spatially flipped,
  input/output-swapped kernel (``Wᵀ`` in the objectives)."""
  return circular_conv(y, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


def _complex_dtype(dtype) -> jnp.dtype:
  return jnp.result_type(dtype, jnp.complex64)


def _phases(size: int, taps: int, frequencies) -> jax.Array:
  """``exp(2πi ω t / size)``, shape ``(len(ω), taps)``, for centred taps ``t``.

  ``frequencies`` is a NumPy array (a constant, computed in float64) or a traced
  index array (the maximizing frequency of :func:`circular_conv_norm`).
  """
  xp = np if isinstance(frequencies, np.ndarray) else jnp
  offsets = np.arange(taps) - taps // 2
  return xp.exp(2j * np.pi * xp.outer(frequencies, offsets) / size)


def circular_conv_symbol(kernel: jax.Array, grid: tuple[int, int], *,
                         half: bool = False) -> jax.Array:
  """``K̂(ω)`` for every frequency of an ``H×W`` grid, shape ``(H, W, C_in, C_out)``.

  The convention is that of the DFT of :func:`circular_conv`:
  ``DFT(circular_conv(z, K))(ω) = DFT(z)(ω) · K̂(ω)``. Kernels larger than the grid
  wrap around; the DFT below sums the aliased taps, so the symbol is exact for any
  grid size. ``half=True`` keeps the real-FFT frequencies ``0 ≤ ω_2 ≤ W/2``
  (shape ``(H, W//2 + 1, C_in, C_out)``), which is all :func:`spectral_product` needs.
  """
  kh, kw = kernel.shape[:2]
  height, width = grid
  dtype = _complex_dtype(kernel.dtype)
  columns = width // 2 + 1 if half else width
  return jnp.einsum("ua,vb,abio->uvio",
                    _phases(height, kh, np.arange(height)).astype(dtype),
                    _phases(width, kw, np.arange(columns)).astype(dtype),
                    kernel.astype(dtype))


def to_spectrum(z: jax.Array) -> jax.Array:
  """The real 2-D FFT of an NHWC map, frequency-major: shape ``(H, W//2 + 1, B, C)``.

  Frequency-major because every use is a per-frequency matrix product over the
  channels (:func:`spectral_product`), a batched matrix multiplication with the
  frequencies as its batch axes; XLA's FFT transforms the minor axes, so the map is
  transposed to channels-first around it. On CPU this layout runs the cell map
  about twice as fast as FFTs over the NHWC axes with an einsum between them.
  """
  spectrum = jnp.fft.rfft2(z.transpose(0, 3, 1, 2))  # (B, C, H, W//2 + 1)
  return spectrum.transpose(2, 3, 0, 1)


def from_spectrum(z_hat: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The inverse of :func:`to_spectrum` for an ``H×W`` grid (a real NHWC map)."""
  return jnp.fft.irfft2(z_hat.transpose(2, 3, 0, 1), s=tuple(grid)).transpose(
      0, 2, 3, 1)


def spectral_product(z_hat: jax.Array, symbol: jax.Array, *,
                     adjoint: bool = False) -> jax.Array:
  """``ẑ(ω) K̂(ω)`` at every frequency (``adjoint``: ``ẑ(ω) K̂(ω)ᴴ``).

  With ``symbol = circular_conv_symbol(K, grid, half=True)``,
  ``from_spectrum(spectral_product(to_spectrum(z), symbol), grid)`` is
  ``circular_conv(z, K)`` and the adjoint variant ``circular_conv_transpose``: the
  operator is real, so its symbol at ``−ω`` is the conjugate of that at ``ω`` and the
  product keeps the Hermitian symmetry the inverse real FFT relies on.
  """
  if adjoint:
    symbol = jnp.conj(jnp.swapaxes(symbol, -1, -2))
  return jnp.matmul(z_hat, symbol)  # (U, V, B, C_in) @ (U, V, C_in, C_out)


def spectral_gram(symbol: jax.Array) -> jax.Array:
  """``K̂(ω)K̂(ω)ᴴ`` per frequency: the symbol of ``WᵀW`` (``C_in × C_in``)."""
  return jnp.einsum("uvio,uvjo->uvij", symbol, jnp.conj(symbol))


def spectral_conv(z: jax.Array, symbol: jax.Array, *, adjoint: bool = False
                  ) -> jax.Array:
  """:func:`circular_conv` (``adjoint``: its transpose) applied through the FFT."""
  return from_spectrum(spectral_product(to_spectrum(z), symbol, adjoint=adjoint),
                       z.shape[1:3])


def _smaller_gram(symbol: jax.Array) -> jax.Array:
  """``K̂ᴴK̂`` or ``K̂K̂ᴴ``, whichever is smaller: both have ``σ_max(K̂)²`` as top eigenvalue."""
  if symbol.shape[-2] < symbol.shape[-1]:
    return jnp.einsum("...io,...jo->...ij", symbol, jnp.conj(symbol))
  return jnp.einsum("...io,...ip->...op", jnp.conj(symbol), symbol)


def _log_trace_power(gram: jax.Array, squarings: int) -> tuple[jax.Array, jax.Array]:
  """``(Σ_j log(s_j) / 2^j, tr(M_k))``, ``M_{j+1} = (M_j / s_j)²``, ``s_j = max tr M_j``.

  Then ``(1/p) log max_ω tr(M_ω^p) = Σ_j log(s_j)/2^j + log(max_ω tr M_k(ω)) / p``
  with ``p = 2^squarings``; the common rescaling keeps the largest trace at one, so
  nothing overflows (traces of the other frequencies may underflow, harmlessly).
  """
  log_scale = jnp.zeros((), jnp.real(gram).dtype)
  for j in range(squarings):
    scale = jnp.max(jnp.real(jnp.trace(gram, axis1=-2, axis2=-1)))
    log_scale = log_scale + jnp.log(scale) / 2 ** j
    gram = gram / scale
    gram = gram @ gram
  return log_scale, jnp.real(jnp.trace(gram, axis1=-2, axis2=-1))


def _norm_bound(kernel: jax.Array, symbol: jax.Array, grid: tuple[int, int],
                squarings: int) -> jax.Array:
  """:func:`circular_conv_norm` from the kernel's real-FFT symbol (``half=True``)."""
  p = 2 ** squarings
  # The bound over the whole grid, not differentiated.
  log_scale, traces = _log_trace_power(_smaller_gram(jax.lax.stop_gradient(symbol)),
                                       squarings)
  bound = jnp.exp(0.5 * (log_scale + jnp.log(jnp.max(traces)) / p))
  # Its gradient is that of the maximizing frequency's term alone: the same bound
  # recomputed, differentiably, for that one C×C matrix.
  u, v = jnp.unravel_index(jnp.argmax(traces), traces.shape)
  dtype = _complex_dtype(kernel.dtype)
  kh, kw = kernel.shape[:2]
  at_max = jnp.einsum("a,b,abio->io", _phases(grid[0], kh, u[None])[0].astype(dtype),
                      _phases(grid[1], kw, v[None])[0].astype(dtype),
                      kernel.astype(dtype))
  log_scale, trace = _log_trace_power(_smaller_gram(at_max), squarings)
  local = jnp.exp(0.5 * (log_scale + jnp.log(trace) / p))
  # Value of the full-grid bound, derivative of the local one (equal values).
  return (jax.lax.stop_gradient(bound - local) + local).astype(kernel.dtype)


def circular_conv_norm(kernel: jax.Array, grid: tuple[int, int], *,
                       squarings: int = 6) -> jax.Array:
  """A certified upper bound on the spectral norm of :func:`circular_conv`.

  With ``M_ω = K̂(ω)ᴴK̂(ω)`` (positive semi-definite, ``n × n``) and ``p = 2^squarings``,

    ‖W‖₂² = max_ω λ_max(M_ω) ≤ (max_ω tr M_ω^p)^{1/p} ≤ n^{1/p} ‖W‖₂²,

  computed by repeated squaring with a rescaling at every step (so nothing
  overflows): ``‖W‖₂ ≤ bound ≤ n^{1/2p} ‖W‖₂`` (≤ 2.7% slack for ``n = 32``,
  ``p = 64``). Unlike an eigendecomposition (slow for thousands of small complex
  matrices on CPU) or power iteration (a *lower* estimate), this is cheap, smooth and
  never underestimates. Only the real-FFT half of the frequencies is needed
  (``M_{−ω}`` is the conjugate of ``M_ω``), and the gradient flows through the
  maximizing frequency only (the derivative of the maximum), so differentiating
  the bound costs one ``n × n`` matrix chain, not one per frequency.
  """
  return _norm_bound(kernel, circular_conv_symbol(kernel, grid, half=True), grid,
                     squarings)


def circular_conv_norm_exact(kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The exact norm ``max_ω σ_max(K̂(ω))`` by eigendecomposition (slow; for tests)."""
  symbol = circular_conv_symbol(kernel, grid)
  gram = jnp.einsum("uvio,uvjo->uvij", jnp.conj(symbol), symbol)
  return jnp.sqrt(jnp.maximum(jnp.max(jnp.linalg.eigvalsh(gram)), 0.0)).astype(
      kernel.dtype)


def matrix_norm(matrix: jax.Array) -> jax.Array:
  """Exact spectral norm of a (small) matrix."""
  return jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(matrix.T @ matrix)))


class SpectralConv(nnx.Module):
  """A circular convolution ``W`` with ``‖W‖₂ ≤ max_norm · sigmoid(gain) < max_norm``.

  Attributes:
    kernel: the free direction ``V`` (HWIO).
    gain: the scalar logit ``g`` of the norm.
  """

  def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
               max_norm: float = 0.9, init_norm: float = 0.5, rngs: nnx.Rngs):
    if not 0 < init_norm < max_norm:
      raise ValueError(f"SpectralConv: need 0 < init_norm < max_norm, got "
                       f"init_norm={init_norm}, max_norm={max_norm}")
    if kernel_size % 2 != 1:
      raise ValueError(f"SpectralConv: kernel_size must be odd, got {kernel_size}")
    fan_in = kernel_size * kernel_size * in_channels
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32)
                            / math.sqrt(fan_in))
    ratio = init_norm / max_norm
    self.gain = nnx.Param(jnp.asarray(math.log(ratio / (1 - ratio)), jnp.float32))
    self.max_norm = max_norm

  def normalized(self, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """``W``'s kernel and real-FFT symbol for states on an ``H×W`` grid.

    The norm depends on the grid, so each branch resolution gets its own ``W``.
    The symbol (``circular_conv_symbol(kernel, grid, half=True)``) is what the
    cells apply inside the solver loops; the kernel is the same operator in space.
    """
    kernel = self.kernel[...]
    symbol = circular_conv_symbol(kernel, grid, half=True)
    scale = (self.max_norm * jax.nn.sigmoid(self.gain[...])
             / _norm_bound(kernel, symbol, grid, squarings=6))
    return kernel * scale, symbol * scale.astype(symbol.dtype)

  def normalized_kernel(self, grid: tuple[int, int]) -> jax.Array:
    """``W``'s kernel for states on an ``H×W`` grid (the norm depends on the grid)."""
    return self.normalized(grid)[0]


class SpectralChannelMap(nnx.Module):
  """A 1×1 channel map ``P`` with ``‖P‖₂ = max_norm · sigmoid(gain)``."""

  def __init__(self, in_channels: int, out_channels: int, *, max_norm: float = 1.0,
               init_norm: float = 0.5, rngs: nnx.Rngs):
    if not 0 < init_norm < max_norm:
      raise ValueError(f"SpectralChannelMap: need 0 < init_norm < max_norm, got "
                       f"init_norm={init_norm}, max_norm={max_norm}")
    self.matrix = nnx.Param(jax.random.normal(
        rngs.params(), (in_channels, out_channels), jnp.float32)
        / math.sqrt(in_channels))
    ratio = init_norm / max_norm
    self.gain = nnx.Param(jnp.asarray(math.log(ratio / (1 - ratio)), jnp.float32))
    self.max_norm = max_norm

  def normalized_matrix(self) -> jax.Array:
    matrix = self.matrix[...]
    return matrix * (self.max_norm * jax.nn.sigmoid(self.gain[...])
                     / matrix_norm(matrix))


def avg_pool2(z: jax.Array) -> jax.Array:
  """2×2 average pooling with stride 2 (NHWC, even height and width); ``‖·‖₂ = 1/2``."""
  b, h, w, c = z.shape
  return z.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def avg_pool2_transpose(y: jax.Array) -> jax.Array:
  """The adjoint of :func:`avg_pool2`: nearest upsampling ×2, divided by 4."""
  return nearest_upsample(y, 2) / 4


def resample(z: jax.Array, levels: int) -> jax.Array:
  """Moves ``z`` ``levels`` resolutions coarser (> 0, average pooling) or finer (< 0,
  nearest upsampling); both preserve the spatial mean."""
  for _ in range(max(levels, 0)):
    z = avg_pool2(z)
  return nearest_upsample(z, 2 ** -levels) if levels < 0 else z

"""Process settings that make XLA:CPU run equilibrium models fast.

:func:`tune_cpu_runtime` is what every jdeq entry point calls before JAX starts its
backend (the first computation); a script of one's own calls it the same way. It

* selects XLA's own (Eigen) convolutions instead of YNNPACK's
  (:data:`CPU_CONVOLUTION_FLAG` in ``XLA_FLAGS``, unless the YNNPACK option is set
  already): they are as fast on one core and, unlike YNNPACK's, keep every core busy;
* picks the matching weight-gradient form of :func:`jdeq.ops.conv2d`
  (:func:`jdeq.ops.set_cpu_weight_gradient`);
* keeps freed host memory for reuse (:func:`jdeq.ops.retain_freed_host_memory`).

Only the CPU backend reads the flag, and only when it starts; the settings change
speed, never results. Measured effects are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os

from jdeq.ops import conv
from jdeq.ops.host_memory import retain_freed_host_memory

_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "-individual_convolution"
#: The XLA_FLAGS option that makes XLA:CPU run convolutions with its own (Eigen)
#: kernels instead of YNNPACK's.
CPU_CONVOLUTION_FLAG = f"--{_YNN_OPTION}={_YNN_WITHOUT_CONVOLUTIONS}"


def tune_cpu_runtime() -> None:
  """Sets up XLA:CPU for jdeq (see the module docstring); call before the first JAX
  computation.

  A YNNPACK option already in ``XLA_FLAGS`` is left as it is; the weight-gradient
  form follows whichever convolutions it selects.
  """
  retain_freed_host_memory()
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_OPTION not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTION_FLAG}".strip()
  match_weight_gradient_to_convolutions()


def match_weight_gradient_to_convolutions() -> str:
  """Selects the weight-gradient form that suits the convolutions ``XLA_FLAGS`` selects.

  ``"forward_conv"`` when XLA's own convolutions run (:data:`CPU_CONVOLUTION_FLAG`),
  ``"im2col"`` for YNNPACK's (XLA:CPU's default); see
  :func:`jdeq.ops.set_cpu_weight_gradient`. For a process that sets ``XLA_FLAGS``
  itself (a benchmark's), after it does and before the first convolution is traced.

  Returns:
    The form selected.
  """
  eigen_convolutions = _YNN_WITHOUT_CONVOLUTIONS in os.environ.get("XLA_FLAGS", "")
  form = "forward_conv" if eigen_convolutions else "im2col"
  conv.set_cpu_weight_gradient(form)
  return form

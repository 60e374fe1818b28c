"""Entry points that compose the library: the training CLI, configs, paper scripts."""

import os

#: XLA's CPU backend hands convolutions to YNNPACK by default. Its own (Eigen)
#: convolutions are as fast on one core and, unlike YNNPACK's, keep every core busy:
#: on a 2-core CPU, MDEQ-Tiny training steps run 25–35% faster and evaluation
#: passes 35% faster with them (``experiments/bench`` measures W2/W3 both ways).
#: Only the CPU backend reads the flag.
CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def use_fast_cpu_convolutions() -> None:
  """Adds :data:`CPU_CONVOLUTION_FLAG` to ``XLA_FLAGS`` unless that option is set.

  Must run before JAX starts its backend (the first computation); every training
  entry point calls it at import.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTION_FLAG}".strip()

"""MDEQ-Tiny training throughput and peak device memory, in a process of its own.

``python -m experiments.device_check.throughput '{"mode": "ift", "batches": [64, 256],
"steps": 5}'`` builds ``jdeq.models.create("mdeq_cifar_tiny")`` for each batch size
(ascending), trains it with ``jdeq.train``'s jitted step (Adam, constant learning rate,
no Jacobian term; ``mode`` ``"ift"`` is the equilibrium step with the config's
implicit gradient, ``"unrolled"`` the pretraining step) on random CIFAR-shaped data
(32×32×3 images, 10 classes), and prints one JSON line with, per batch size:

* ``compile_s``: ``jit(...).lower(...).compile()`` of the step, timed on its own;
* ``first_step_s``: the first call of the compiled step (buffer allocation, autotuning
  caches);
* ``step_s``: the median of ``steps`` further steps (each waited for), and
  ``images_per_s = batch / step_s``;
* ``peak_bytes_in_use``: the device allocator's peak since the process started
  (``device.memory_stats()``; None where the backend keeps no such statistics, as
  XLA:CPU). The peak never decreases within a process, hence one process per
  gradient mode and the batch sizes in ascending order: each peak is then the
  larger batch's own (a step's memory grows with its batch);
* ``temp_bytes``/``argument_bytes``/``output_bytes``: XLA's compile-time figures for
  the step (its working memory beyond inputs and outputs), on every backend.

One device is used (the first), so figures are per chip. This module is the only
part of the device check that imports the training stack.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Optional, Sequence

from jdeq import config, require, require_choice

MODEL = "mdeq_cifar_tiny"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MODES = ("ift", "unrolled")


@config
class ThroughputSettings:
  """What one throughput process measures.

  Attributes:
    mode: ``"ift"`` (the equilibrium step) or ``"unrolled"`` (pretraining step).
    batches: batch sizes, measured in ascending order.
    steps: timed steps per batch size (after the first call).
    seed: model initialization, training key and data.
    budget: None: the configuration's solver budgets (Broyden, 19 forward and 21
      backward evaluations; 10 unrolled steps). An integer: that many forward and
      backward Broyden evaluations and unrolled steps (a quick run on a CPU).
  """
  mode: str = "ift"
  batches: tuple = (64, 256)
  steps: int = 5
  seed: int = 0
  budget: Optional[int] = None

  def __post_init__(self) -> None:
    require_choice(self, "mode", self.mode, MODES)
    require(isinstance(self.batches, tuple) and len(self.batches) > 0
            and all(isinstance(b, int) and b >= 1 for b in self.batches), self,
            f"batches must be a non-empty tuple of integers >= 1, got {self.batches!r}")
    require(isinstance(self.steps, int) and self.steps >= 1, self,
            f"steps must be an integer >= 1, got {self.steps!r}")
    require(self.budget is None or (isinstance(self.budget, int) and self.budget >= 1),
            self, f"budget must be None or an integer >= 1, got {self.budget!r}")

  def model_overrides(self) -> dict:
    """The ``jdeq.models.create`` overrides of :attr:`budget` (none by default)."""
    if self.budget is None:
      return {}
    import jdeq  # pylint: disable=g-import-not-at-top
    solver = jdeq.Broyden(max_iter=self.budget, tol=1e-3, stop_mode="rel",
                          memory=self.budget)
    return dict(solver=solver, eval_solver=solver, grad=jdeq.IFT(solver),
                unrolled_steps=self.budget)


def random_batch(batch: int, seed: int) -> dict:
  """``{"image": (B, 32, 32, 3) float32 N(0, 1), "label": (B,) int32}`` (host arrays)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32),
          "label": rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)}


def _memory_figures(compiled) -> dict:
  analysis = compiled.memory_analysis()
  names = ("temp_bytes", "argument_bytes", "output_bytes")
  if analysis is None:
    return dict.fromkeys(names)
  return {"temp_bytes": int(analysis.temp_size_in_bytes),
          "argument_bytes": int(analysis.argument_size_in_bytes),
          "output_bytes": int(analysis.output_size_in_bytes)}


def peak_bytes_in_use(device) -> int | None:
  """The allocator's peak bytes since the process started, or None (no statistics)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the API)
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_batch(batch: int, settings: ThroughputSettings, device) -> dict[str, Any]:
  """Compiles and times the training step of one batch size on ``device``."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jdeq import models, train  # pylint: disable=g-import-not-at-top

  mesh = train.data_mesh([device])
  model = models.create(MODEL, rngs=nnx.Rngs(settings.seed), **settings.model_overrides())
  train_config = train.TrainConfig(optimizer="adam", lr=1e-3, schedule="constant",
                                   total_steps=settings.steps + 1, seed=settings.seed)
  optimizer = train.make_optimizer(train_config, 1)
  state = train.replicate(
      train.create_train_state(model, optimizer, seed=settings.seed), mesh)
  del model
  data = train.shard_batch(random_batch(batch, settings.seed), mesh)
  step = train.make_train_step(optimizer, train.JacobianSchedule(),
                               unrolled=settings.mode == "unrolled", mesh=mesh)

  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(state, data))
  first_step_s = time.perf_counter() - start
  times = []
  for _ in range(settings.steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, data))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {
      "batch": batch, "mode": settings.mode, "compile_s": compile_s,
      "first_step_s": first_step_s, "step_s": step_s, "step_times_s": times,
      "images_per_s": batch / step_s,
      "peak_bytes_in_use": peak_bytes_in_use(device),
      **_memory_figures(compiled),
      "loss": float(metrics.loss), "fwd_nfe": float(metrics.fwd_nfe),
      "nonfinite": float(metrics.nonfinite),
  }


def measure(settings: ThroughputSettings) -> dict[str, Any]:
  """Every batch size of ``settings``, ascending, on the first device."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}", "model": MODEL,
          "mode": settings.mode, "steps": settings.steps, "budget": settings.budget,
          "runs": [measure_batch(b, settings, device) for b in sorted(settings.batches)]}


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 1:
    raise SystemExit("usage: python -m experiments.device_check.throughput "
                     "'{\"mode\": \"ift\", \"batches\": [64, 256], \"steps\": 5}'")
  from jdeq import ops  # pylint: disable=g-import-not-at-top
  ops.tune_cpu_runtime()  # as every entry point, before JAX's first computation
  options = json.loads(argv[0])
  if "batches" in options:
    options["batches"] = tuple(options["batches"])
  print(json.dumps(measure(ThroughputSettings(**options))), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Times one MDEQ training step (forward solve + IFT backward + Adam) on this host.

  python -m experiments.bench_mdeq_step [--config mdeq_cifar_tiny] [--batch 64]

Prints, for the equilibrium step and for the unrolled ("pretraining") step, the
compile time (first call, tracing + XLA compilation + one execution) and the
steady-state time: the median of ``--repeats`` calls after one warm-up call. Random images and labels are used: the cost of a step depends on shapes and
solver budgets (the solver runs its full budget unless every sample converges).
"""

from __future__ import annotations


import argparse
import statistics
import time

import experiments
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdeq import models

experiments.tune_cpu_runtime()  # must precede JAX's first computation


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="mdeq_cifar_tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--image-size", type=int, default=32)
  args = parser.parse_args(argv)

  start = time.perf_counter()
  model = models.create(args.config, rngs=nnx.Rngs(0))
  print(f"{args.config}: batch {args.batch}, {jax.devices()[0].platform}, Adam")
  print(f"  model creation:       {time.perf_counter() - start:.2f} s", flush=True)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  keys = jax.random.split(jax.random.key(0))
  images = jax.random.normal(keys[0], (args.batch, args.image_size, args.image_size, 3))
  labels = jax.random.randint(keys[1], (args.batch,), 0, model.config.num_classes)

  for unrolled in (False, True):
    _time_step(model, optimizer, images, labels, unrolled=unrolled,
               repeats=args.repeats)


def _time_step(model, optimizer, images, labels, *, unrolled: bool,
               repeats: int) -> None:
  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits, aux = model(images, train=True, unrolled=unrolled)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, aux.stats.nstep
    (loss, nstep), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, nstep

  print("unrolled (pretraining) step:" if unrolled else "equilibrium step (IFT):")
  start = time.perf_counter()
  jax.block_until_ready(train_step(model, optimizer, images, labels))
  print(f"  compile (first step): {time.perf_counter() - start:.2f} s", flush=True)
  jax.block_until_ready(train_step(model, optimizer, images, labels))  # warm-up
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    _, nstep = jax.block_until_ready(train_step(model, optimizer, images, labels))
    samples.append(time.perf_counter() - start)
  print(f"  steady-state step:    {statistics.median(samples):.3f} s (median of "
        f"{len(samples)}; min {min(samples):.3f}, max {max(samples):.3f})")
  print(f"  forward evaluations:  {float(jnp.mean(nstep)):.1f} per sample (last step)")

if __name__ == "__main__":
  main()

"""Foundation benchmark: one Anderson + IFT training step against its physical limit.

The map is ``f(z, x) = tanh(W z + U x)`` with ``d = 64``, batch 32. The forward solve
is Anderson (m = 6) with exactly 30 evaluations (a tolerance of 1e-30 never stops
it early) and
the IFT backward solve is Anderson with exactly 30 vector–Jacobian products. The
loss is ``ℓ = ½ mean_b ‖z*_b‖²`` and the step differentiates it in ``(W, U)``.

Reported, as medians with spread over many jitted calls:

* forward: the forward pass of the training step (the solve, keeping what the
  backward pass needs), ``jax.vjp`` under ``jax.jit``;
* backward: the pullback of that forward pass, jitted on its own;
* forward+backward: ``jax.value_and_grad`` of the loss in one jitted function;
* bare: jitted loops of the same number of plain evaluations of ``f`` (31: the 30 of
  the solve and the one linearization at ``z*``) and of VJPs (31: the 30 of the
  backward solve and the one in ``(W, U)``), the cost of ``f`` alone;
* the overhead ratios step / bare.

Run: ``python -m experiments.bench.core_step [--reps N --rounds R --json PATH]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp

import jdeq
from experiments.bench import timing

DIM = 64
BATCH = 32
ITERATIONS = 30
ANDERSON_MEMORY = 6
# The solvers reject tol = 0; a tolerance no float32 residual above zero can reach
# makes every solve run its whole budget (checked by ``solve_counts``).
FULL_BUDGET_TOL = 1e-30


def tanh_map(z: jax.Array, weights: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """``f(z, x) = tanh(W z + U x)`` on a batch of row vectors."""
  return jnp.tanh(z @ weights["W"].T + x @ weights["U"].T)


def make_problem(key: jax.Array, dim: int = DIM, batch: int = BATCH):
  """Weights with ‖W‖₂ ≈ 0.9 (a contraction, as a trained DEQ would be) and an input."""
  key_w, key_u, key_x = jax.random.split(key, 3)
  # A d×d Gaussian matrix with entry variance 1/d has spectral norm ≈ 2.
  weights = {
      "W": 0.45 * jax.random.normal(key_w, (dim, dim)) / jnp.sqrt(dim),
      "U": jax.random.normal(key_u, (dim, dim)) / jnp.sqrt(dim),
  }
  x = jax.random.normal(key_x, (batch, dim))
  return weights, x


def solver_config(iterations: int = ITERATIONS) -> tuple[jdeq.Anderson, jdeq.IFT]:
  """Forward solver and IFT gradient that both run their whole budget."""
  forward = jdeq.Anderson(max_iter=iterations, tol=FULL_BUDGET_TOL, m=ANDERSON_MEMORY)
  backward = jdeq.Anderson(max_iter=iterations, tol=FULL_BUDGET_TOL, stop_mode="abs",
                           m=ANDERSON_MEMORY)
  return forward, jdeq.IFT(solver=backward)


def build_functions(iterations: int = ITERATIONS) -> dict[str, Any]:
  """The jitted functions that are timed, keyed by what they measure."""
  solver, gradient = solver_config(iterations)

  def loss(weights, x):
    z0 = jnp.zeros_like(x)
    z_star, _ = jdeq.fixed_point(tanh_map, z0, weights, x, solver=solver, grad=gradient)
    return 0.5 * jnp.mean(jnp.sum(z_star**2, axis=1))

  def bare_evaluations(weights, x):
    # One evaluation more than the solve: the IFT rule linearizes f at z*.
    return jax.lax.fori_loop(0, iterations + 1, lambda _, z: tanh_map(z, weights, x),
                             jnp.zeros_like(x))

  def bare_vjps(weights, x, z_star):
    # The backward solve applies the transposed Jacobian at z* ``iterations`` times;
    # one more VJP carries the result to the weights.
    _, pullback = jax.vjp(lambda z, w: tanh_map(z, w, x), z_star, weights)
    cotangent = z_star / z_star.shape[0]
    u = jax.lax.fori_loop(0, iterations, lambda _, u: pullback(u)[0] + cotangent,
                          cotangent)
    return pullback(u)[1]

  def bare_both(weights, x):
    z = bare_evaluations(weights, x)
    return bare_vjps(weights, x, z)

  return {
      "forward": jax.jit(lambda w, x: jax.vjp(lambda w_: loss(w_, x), w)),
      "backward": jax.jit(lambda pullback: pullback(jnp.ones((), jnp.float32))),
      "forward_backward": jax.jit(jax.value_and_grad(loss)),
      "bare_evaluations": jax.jit(bare_evaluations),
      "bare_vjps": jax.jit(bare_vjps),
      "bare_both": jax.jit(bare_both),
      "loss": loss,
  }


def solve_counts(weights, x, iterations: int = ITERATIONS) -> dict[str, Any]:
  """Forward and backward evaluation counts and residuals, from the solver statistics."""
  solver, gradient = solver_config(iterations)

  def probed_loss(weights, probe):
    z_star, stats = jdeq.fixed_point(tanh_map, jnp.zeros_like(x), weights, x,
                                     solver=solver, grad=gradient, backward_probe=probe)
    return 0.5 * jnp.mean(jnp.sum(z_star**2, axis=1)), stats

  probe = jdeq.backward_stats_probe(x.shape[0])
  (_, forward_stats), (_, probe_grad) = jax.jit(
      jax.value_and_grad(probed_loss, argnums=(0, 1), has_aux=True))(weights, probe)
  backward_stats = jdeq.backward_stats(probe_grad)
  return {
      "forward_nfe": int(jnp.max(forward_stats.nstep)),
      "backward_nvjp": int(jnp.max(backward_stats.nstep)),
      "forward_rel_residual": float(jnp.median(forward_stats.rel_residual)),
      "backward_abs_residual": float(jnp.median(backward_stats.abs_residual)),
  }


def run(reps: int = 200, rounds: int = 5, warmup: int = 20, seed: int = 0,
        iterations: int = ITERATIONS) -> dict[str, Any]:
  """Runs the benchmark and returns its figures (seconds) as a JSON-ready dict."""
  weights, x = make_problem(jax.random.key(seed))
  fns = build_functions(iterations)
  _, pullback = fns["forward"](weights, x)
  z_star = fns["bare_evaluations"](weights, x)

  calls = {
      "forward": lambda: jax.block_until_ready(fns["forward"](weights, x)),
      "backward": lambda: jax.block_until_ready(fns["backward"](pullback)),
      "forward_backward": lambda: jax.block_until_ready(
          fns["forward_backward"](weights, x)),
      "bare_evaluations": lambda: jax.block_until_ready(
          fns["bare_evaluations"](weights, x)),
      "bare_vjps": lambda: jax.block_until_ready(fns["bare_vjps"](weights, x, z_star)),
      "bare_both": lambda: jax.block_until_ready(fns["bare_both"](weights, x)),
  }
  for call in calls.values():
    for _ in range(warmup):
      call()
  # Rounds interleave the measured functions, so slow drift of the machine affects
  # numerators and denominators of the ratios alike.
  samples = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      samples[name].append(timing.time_round(call, reps))
  timings = {name: timing.Timing.from_samples(s) for name, s in samples.items()}

  def ratio(numerator, denominator):
    return timings[numerator].median / timings[denominator].median

  return {
      "benchmark": "core_step",
      "device": describe_device(),
      "load": timing.machine_load(),
      "problem": {"map": "tanh(W z + U x)", "dim": DIM, "batch": BATCH,
                  "solver": f"Anderson(m={ANDERSON_MEMORY})", "gradient": "IFT(Anderson)",
                  "forward_iterations": iterations, "backward_iterations": iterations},
      "counts": solve_counts(weights, x, iterations),
      "timings": {name: t.as_dict() for name, t in timings.items()},
      "ratios": {
          "forward_backward_over_bare": ratio("forward_backward", "bare_both"),
          "forward_over_bare_evaluations": ratio("forward", "bare_evaluations"),
          "backward_over_bare_vjps": ratio("backward", "bare_vjps"),
      },
  }


def describe_device() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind} (jax {jax.__version__})"


def format_report(result: dict[str, Any]) -> str:
  t = result["timings"]
  lines = [
      f"device: {result['device']}   load average: {result['load']['load1']:.2f} "
      f"on {result['load']['cores']} cores",
      "problem: " + ", ".join(f"{k}={v}" for k, v in result["problem"].items()),
      "counts: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in result["counts"].items()),
      f"{'measure':<18}{'median ms':>11}{'p25':>9}{'p75':>9}   round medians (ms)",
  ]
  for name, figures in t.items():
    rounds = " ".join(f"{m * 1e3:.3f}" for m in figures["round_medians"])
    lines.append(f"{name:<18}{figures['median'] * 1e3:>11.3f}{figures['p25'] * 1e3:>9.3f}"
                 f"{figures['p75'] * 1e3:>9.3f}   {rounds}")
  lines += [f"ratio {k}: {v:.2f}" for k, v in result["ratios"].items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=200, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=5, help="rounds per measure")
  parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args(argv)
  warning = timing.idle_warning()
  if warning:
    print(warning, file=sys.stderr)
  result = run(reps=args.reps, rounds=args.rounds, warmup=args.warmup, seed=args.seed)
  timing.publish(format_report(result), result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

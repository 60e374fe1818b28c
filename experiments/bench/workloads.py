"""The benchmark workloads and variants, shared verbatim by the jdeq and TorchDEQ sides.

Both sides build their models from the arrays of :func:`initial_arrays`, so W1 and W2
start from identical weights, inputs and labels; only the framework differs. W3,
MDEQ-Tiny, is built by each framework's own model code (jdeq's model zoo; the
PyTorch port in :mod:`experiments.bench.torch_mdeq`) with the same architecture,
parameter count and init scheme; its weights are drawn independently, its images
and labels (:func:`w3_batch`) are shared.

Only the standard library and NumPy are used here: the TorchDEQ worker imports this
module from its own virtual environment, where JAX is absent.

Weight layouts of the shared arrays: dense kernels ``(out, in)``; convolution
kernels ``(height, width, in, out)`` (JAX's HWIO; the TorchDEQ side transposes them to
OIHW). Images are NHWC (the TorchDEQ side transposes to NCHW).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The solvers of both libraries stop a sample once its residual is <= (jdeq) or
# < (TorchDEQ) the tolerance; no float32 residual above zero reaches this one, so
# every solve runs its whole budget (the recorded NFE confirm it).
FULL_BUDGET_TOL = 1e-30

SOLVERS = ("fixed_point_iteration", "anderson", "broyden")
GRADIENTS = ("ift", "phantom", "jfb", "correction")
UNROLLED = "unrolled"
ANDERSON_MEMORY = 6
PHANTOM_STEPS = 5
PHANTOM_DAMPING = 0.5
# Fixed-point correction (DEQ-Flow): the loss over CORRECTION_STATES evenly spaced
# states of the solve (TorchDEQ's n_states), each with a one-step gradient, weighted
# CORRECTION_DECAY^(N-1-j).
CORRECTION_STATES = 4
CORRECTION_DECAY = 0.8
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark problem.

  Attributes:
    name: ``"w1"``, ``"w2"``, ``"w3"`` or ``"w3ref"``.
    title: a human description.
    batch: batch size.
    forward_iters: forward solver budget (map evaluations).
    backward_iters: IFT backward solver budget (vector–Jacobian products).
    default_variants: variants the default run measures (the full matrix is
      :func:`all_variants`).
    reps: timed calls per round in a default run.
    rounds: rounds per side in a default run (the sides alternate round by round).
    warmup: untimed calls of each measured function first (the first call of the
      step itself, which compiles it, is not counted).
  """
  name: str
  title: str
  batch: int
  forward_iters: int
  backward_iters: int
  default_variants: tuple[str, ...]
  reps: int
  rounds: int
  warmup: int = 2


def all_variants(gradients: tuple[str, ...] = GRADIENTS) -> tuple[str, ...]:
  """Every solver × gradient pair, plus the solver-free unrolled baseline."""
  return tuple(f"{s}/{g}" for s in SOLVERS for g in gradients) + (UNROLLED,)


def split_variant(variant: str) -> tuple[str | None, str]:
  """``"anderson/ift"`` → ``("anderson", "ift")``; ``"unrolled"`` → ``(None, "unrolled")``."""
  if variant == UNROLLED:
    return None, UNROLLED
  solver, _, gradient = variant.partition("/")
  if solver not in SOLVERS or gradient not in GRADIENTS:
    raise ValueError(f"unknown variant {variant!r}; valid variants are {list(all_variants())}")
  return solver, gradient


# Budgets sized so that the default run (W1, W2, W3) takes under 15 minutes on a
# quiet 2-core CPU: an MDEQ-Tiny step takes seconds there, so W3 times one variant
# with one call per round (``--variants all --scale 4`` for the full matrix, 12 runs).
W1 = Workload(
    name="w1", title="MLP tanh(Wz + Ux), weight norm on W, d=64", batch=32,
    forward_iters=30, backward_iters=30,
    default_variants=all_variants(("ift", "phantom", "jfb")),
    reps=20, rounds=3)
W2 = Workload(
    name="w2", title="conv GroupNorm(ReLU(conv2(ReLU(conv1 z)) + inj x)), 32 ch, 16x16",
    batch=32, forward_iters=20, backward_iters=20,
    default_variants=("fixed_point_iteration/ift", "anderson/ift", "broyden/ift",
                      "anderson/phantom", "anderson/jfb", "anderson/correction",
                      UNROLLED),
    reps=4, rounds=3)
W3 = Workload(
    name="w3", title="MDEQ-Tiny (CIFAR-10 config), 32x32", batch=64,
    forward_iters=18, backward_iters=20, default_variants=("anderson/ift",),
    reps=1, rounds=3, warmup=1)
# Opt-in (it needs a checkout of the authors' code): MDEQ-Tiny's own training steps
# in jdeq and in locuslab/deq's MDEQ-Vision, each side training as its own loop does
# (Broyden 18/20 steps at the yaml's tolerance 1e-3, IFT, Adam 1e-3), on W3's batch.
# Its "variants" are the two steps of an MDEQ run (REFERENCE_KINDS); budgets are
# the yaml's F_THRES/B_THRES Broyden steps.
W3REF = Workload(
    name="w3ref", title="MDEQ-Tiny (CIFAR-10 config), 32x32, each side's own "
    "training step (jdeq vs the authors' locuslab/deq code)", batch=64,
    forward_iters=18, backward_iters=20, default_variants=("equilibrium", "unrolled"),
    reps=1, rounds=3, warmup=1)
REFERENCE_KINDS = W3REF.default_variants
WORKLOADS = {w.name: w for w in (W1, W2, W3, W3REF)}
DEFAULT_WORKLOADS = ("w1", "w2", "w3")

# Shapes of W1 and W2.
W1_DIM = 64
W2_CHANNELS = 32
W2_GROUPS = 8
W2_SIZE = 16
W2_IN_CHANNELS = 3
# W3: CIFAR-10 images.
W3_IMAGE_SIZE = 32
W3_IN_CHANNELS = 3
# The jdeq model-zoo name of W3, and its parameter count (both sides must match it).
W3_MODEL = "mdeq_cifar_tiny"
W3_PARAMS = 158_890


def workload(name: str) -> Workload:
  if name not in WORKLOADS:
    raise ValueError(f"unknown workload {name!r}; valid workloads are {sorted(WORKLOADS)}")
  return WORKLOADS[name]


def _scaled_normal(rng: np.random.Generator, shape, fan_in: int, gain: float):
  return (gain / np.sqrt(fan_in) * rng.standard_normal(shape)).astype(np.float32)


def _row_norms(kernel: np.ndarray, out_axis: int) -> np.ndarray:
  """Weight-norm gains initialized to the norm of each output unit (as TorchDEQ does)."""
  axes = tuple(a for a in range(kernel.ndim) if a != out_axis % kernel.ndim)
  return np.sqrt(np.sum(kernel.astype(np.float64)**2, axis=axes)).astype(np.float32)


def initial_arrays(name: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Weights, inputs and labels of W1 or W2, drawn from ``np.random.default_rng(seed)``.

  W1: ``W_v`` (d, d) with its weight-norm gains ``W_g`` (d,), ``U`` (d, d), head
  ``head_w`` (10, d), ``head_b``; ``x`` (B, d). ``W`` is scaled to spectral norm ≈ 0.9
  (each row of a Gaussian d×d matrix with variance 1/d has norm ≈ 1 and the matrix
  spectral norm ≈ 2), so the map is a contraction as in a trained DEQ.

  W2: ``conv1_v``/``conv2_v`` (3, 3, C, C) with gains ``conv1_g``/``conv2_g`` (C,),
  ``conv2_b``; injection ``inj_w`` (3, 3, 3, C), ``inj_b``; GroupNorm ``gn_scale``,
  ``gn_bias``; head ``head_w`` (10, C), ``head_b``; ``x`` (B, 16, 16, 3).

  Both: ``labels`` (B,) int32.
  """
  rng = np.random.default_rng(seed)
  if name == "w1":
    d, batch = W1_DIM, W1.batch
    w_v = _scaled_normal(rng, (d, d), d, 0.45)
    arrays = {
        "W_v": w_v, "W_g": _row_norms(w_v, 0),
        "U": _scaled_normal(rng, (d, d), d, 1.0),
        "head_w": _scaled_normal(rng, (NUM_CLASSES, d), d, 1.0),
        "head_b": np.zeros((NUM_CLASSES,), np.float32),
        "x": rng.standard_normal((batch, d)).astype(np.float32),
    }
  elif name == "w2":
    c, batch, size = W2_CHANNELS, W2.batch, W2_SIZE
    conv1 = _scaled_normal(rng, (3, 3, c, c), 9 * c, 1.0)
    conv2 = _scaled_normal(rng, (3, 3, c, c), 9 * c, 1.0)
    arrays = {
        "conv1_v": conv1, "conv1_g": _row_norms(conv1, -1),
        "conv2_v": conv2, "conv2_g": _row_norms(conv2, -1),
        "conv2_b": np.zeros((c,), np.float32),
        "inj_w": _scaled_normal(rng, (3, 3, W2_IN_CHANNELS, c), 9 * W2_IN_CHANNELS, 1.0),
        "inj_b": np.zeros((c,), np.float32),
        "gn_scale": np.ones((c,), np.float32), "gn_bias": np.zeros((c,), np.float32),
        "head_w": _scaled_normal(rng, (NUM_CLASSES, c), c, 1.0),
        "head_b": np.zeros((NUM_CLASSES,), np.float32),
        "x": rng.standard_normal((batch, size, size, W2_IN_CHANNELS)).astype(np.float32),
    }
  else:
    raise ValueError(f"initial_arrays covers w1 and w2, got {name!r}")
  arrays["labels"] = rng.integers(0, NUM_CLASSES, size=(arrays["x"].shape[0],),
                                  dtype=np.int32)
  return arrays


def w3_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """W3's input batch: ``x`` NHWC images ``(64, 32, 32, 3)`` and int32 ``labels``.

  Standard-normal pixels stand in for normalized CIFAR-10 images: a step's cost
  depends on shapes and budgets only (every solve runs its full budget).
  """
  rng = np.random.default_rng(seed)
  size = W3_IMAGE_SIZE
  x = rng.standard_normal((W3.batch, size, size, W3_IN_CHANNELS)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(W3.batch,), dtype=np.int32)
  return {"x": x, "labels": labels}


def evaluation_counts(variant: str, spec: Workload, forward_iters: int | None = None
                      ) -> tuple[int, int]:
  """Map evaluations and VJPs a training step of ``variant`` needs at the least.

  This is the denominator of the overhead ratio: the same number of bare
  evaluations and VJPs of ``f``, without any solver.

  * IFT: the forward budget plus one linearization at ``z*``; the backward budget
    plus the one VJP that carries the adjoint to the parameters.
  * Phantom (k steps) and JFB (k = 1): forward budget + k evaluations, k VJPs.
  * Correction: forward budget + one evaluation and one VJP per state.
  * Unrolled: forward-budget steps, each evaluated and differentiated once.
  """
  forward = spec.forward_iters if forward_iters is None else forward_iters
  _, gradient = split_variant(variant)
  if gradient == "ift":
    return forward + 1, spec.backward_iters + 1
  if gradient == "phantom":
    return forward + PHANTOM_STEPS, PHANTOM_STEPS
  if gradient == "jfb":
    return forward + 1, 1
  if gradient == "correction":
    return forward + CORRECTION_STATES, CORRECTION_STATES
  return forward, forward

"""The jdeq side of the benchmark: each workload × variant as jitted functions.

A workload is described by a :class:`Cell`: its parameters, its input batch, how
one training step prepares the arguments of the map (weight norm and injection
computed once per step, as the papers prescribe), the map ``f(z, *args)`` itself and
the classification head. :func:`build_variant` turns a cell and a variant name into
the functions that are timed:

* ``forward``: the forward pass of a training step, ``jax.vjp`` of the loss (the
  solve, keeping what the backward pass needs);
* ``backward``: the pullback returned by ``forward``;
* ``step``: loss, gradients and an SGD update in one jitted function (the figure
  compared with TorchDEQ), which also returns the statistics of both solves;
* ``bare``: the same number of bare map evaluations and VJPs as the step needs
  (:func:`experiments.bench.workloads.evaluation_counts`), the denominator of the
  overhead ratio.

Workload w3ref instead times MDEQ-Tiny's own training steps, the ones jdeq's
training loop compiles (:func:`training_step`), beside the authors' code.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import experiment as experiment_lib
from jdeq import models, nn
from jdeq import train as train_lib
from jdeq.nn import NORM_EPSILON, group_norm_nhwc
from jdeq.ops import conv2d
from experiments import configs
from experiments.bench import workloads

PyTree = Any
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Cell:
  """A workload, framework-side.

  Attributes:
    params: the trainable parameters (a pytree).
    batch: ``{"x": inputs, "labels": int32 labels}``.
    prepare: ``(params, x) -> (map_args, z0)``, run once per step.
    map: ``f(z, *map_args)``.
    logits: ``(params, z_star) -> logits``.
  """
  params: PyTree
  batch: dict
  prepare: Callable
  map: Callable
  logits: Callable


def _weight_norm(direction: jax.Array, gain: jax.Array, out_axis: int) -> jax.Array:
  """``g · v / ‖v‖`` with one gain per output unit (norm over all other axes)."""
  axes = tuple(a for a in range(direction.ndim) if a != out_axis % direction.ndim)
  norm = jnp.sqrt(jnp.sum(direction**2, axis=axes, keepdims=True))
  shape = [1] * direction.ndim
  shape[out_axis] = -1
  return direction * (gain.reshape(shape) / norm)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return conv2d(x, kernel)


def _mlp_map(z, weight, injection):
  return jnp.tanh(z @ weight.T + injection)


def _conv_map(z, conv1, conv2, conv2_bias, injection, gn_scale, gn_bias):
  y = _conv(jax.nn.relu(_conv(z, conv1)), conv2) + conv2_bias
  return group_norm_nhwc(jax.nn.relu(y + injection), workloads.W2_GROUPS, gn_scale,
                         gn_bias, NORM_EPSILON)


def mlp_cell(seed: int = 0) -> Cell:
  """W1 from the shared initial arrays."""
  arrays = {k: jnp.asarray(v) for k, v in workloads.initial_arrays("w1", seed).items()}
  params = {k: arrays[k] for k in ("W_v", "W_g", "U", "head_w", "head_b")}

  def prepare(p, x):
    injection = x @ p["U"].T
    return (_weight_norm(p["W_v"], p["W_g"], 0), injection), jnp.zeros_like(injection)

  return Cell(params=params, batch={"x": arrays["x"], "labels": arrays["labels"]},
              prepare=prepare, map=_mlp_map,
              logits=lambda p, z: z @ p["head_w"].T + p["head_b"])


def conv_cell(seed: int = 0) -> Cell:
  """W2 from the shared initial arrays."""
  arrays = {k: jnp.asarray(v) for k, v in workloads.initial_arrays("w2", seed).items()}
  params = {k: v for k, v in arrays.items() if k not in ("x", "labels")}

  def prepare(p, x):
    injection = _conv(x, p["inj_w"]) + p["inj_b"]
    args = (_weight_norm(p["conv1_v"], p["conv1_g"], -1),
            _weight_norm(p["conv2_v"], p["conv2_g"], -1), p["conv2_b"], injection,
            p["gn_scale"], p["gn_bias"])
    return args, jnp.zeros_like(injection)

  def logits(p, z):
    return jnp.mean(z, axis=(1, 2)) @ p["head_w"].T + p["head_b"]

  return Cell(params=params, batch={"x": arrays["x"], "labels": arrays["labels"]},
              prepare=prepare, map=_conv_map, logits=logits)


def mdeq_cell(seed: int = 0) -> Cell:
  """W3: jdeq's MDEQ-Tiny (``models.create("mdeq_cifar_tiny")``) as a :class:`Cell`.

  One step runs the model as its own ``__call__`` does in training — stem with batch
  statistics, the cell's ``prepare`` (weight norm, dropout masks) once, the solve,
  the head — but with the benchmark's solver and gradient instead of the config's.
  The model is split once into its Params (differentiated) and the rest (batch
  statistics, RNG state), and merged into a functional copy inside the step, so the
  step is a pure function of the Params like those of W1 and W2.
  """
  model = models.create(workloads.W3_MODEL, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cell_map, _ = model.deq.pure_map()  # f(z, cell_params, prepared, injection)
  # One fixed key: the masks are drawn anew in every step (as TorchDEQ's reset_deq
  # does) at the same cost; their values do not matter for timing.
  dropout_key = jax.random.key(seed)
  arrays = workloads.w3_batch(seed)
  size = (workloads.W3_IMAGE_SIZE,) * 2

  def merged(p):
    return nnx.merge(graphdef, p, rest, copy=True)

  def prepare(p, images):
    m = merged(p)
    injection = m.stem(images, train=True)
    prepared = m.deq.cell.prepare(injection, train=True, key=dropout_key)
    cell_params = nnx.state(m.deq.cell, nnx.Param)
    return (cell_params, prepared, injection), m.deq.cell.initial_state(injection)

  def logits(p, z):
    return merged(p).head(z, train=True, output_size=size)

  return Cell(params=params,
              batch={"x": jnp.asarray(arrays["x"]), "labels": jnp.asarray(arrays["labels"])},
              prepare=prepare, map=cell_map, logits=logits)


def parameter_count(cell: Cell) -> int:
  """Number of trainable scalars of a cell (compared across frameworks for W3)."""
  return nn.num_params(cell.params)


def build_cell(workload: str, seed: int = 0) -> Cell:
  if workload == "w1":
    return mlp_cell(seed)
  if workload == "w2":
    return conv_cell(seed)
  if workload == "w3":
    return mdeq_cell(seed)
  raise ValueError(f"unknown workload {workload!r}; valid workloads are "
                   f"{sorted(workloads.WORKLOADS)}")


def solver_and_gradient(workload: str, variant: str, forward_iters: int | None = None):
  """The jdeq configuration of ``variant``: ``(solver, gradient)``."""
  spec = workloads.workload(workload)
  forward = spec.forward_iters if forward_iters is None else forward_iters
  solver_name, gradient_name = workloads.split_variant(variant)
  if gradient_name == workloads.UNROLLED:
    return jdeq.FixedPointIteration(max_iter=forward), jdeq.Unrolled(steps=forward)

  def make(name, budget, stop_mode):
    options = dict(max_iter=budget, tol=workloads.FULL_BUDGET_TOL, stop_mode=stop_mode)
    if name == "anderson":
      return jdeq.Anderson(m=workloads.ANDERSON_MEMORY, **options)
    if name == "broyden":
      return jdeq.Broyden(memory=budget, **options)  # TorchDEQ keeps every update
    return jdeq.FixedPointIteration(**options)

  solver = make(solver_name, forward, "rel")
  if gradient_name == "ift":
    gradient = jdeq.IFT(solver=make(solver_name, spec.backward_iters, "abs"))
  elif gradient_name == "phantom":
    gradient = jdeq.Phantom(k=workloads.PHANTOM_STEPS, damping=workloads.PHANTOM_DAMPING)
  else:  # jfb, and each state of the correction loss (TorchDEQ's grad=1, tau=1)
    gradient = jdeq.JFB()
  return solver, gradient


@dataclasses.dataclass
class Variant:
  """The jitted functions of one workload × variant and their arguments."""
  cell: Cell
  forward: Callable
  backward: Callable
  step: Callable
  bare: Callable
  read_counts: Callable[[Any], dict]
  compiled_step: Callable | None = None

  def counts(self) -> dict:
    """NFE, residuals and divergences of both solves, from one training step."""
    step = self.compiled_step or self.step
    return self.read_counts(step(self.cell.params, self.cell.batch))

  def calls(self) -> dict[str, Callable[[], Any]]:
    """Zero-argument calls that block until their result is ready."""
    params, batch = self.cell.params, self.cell.batch
    _, pullback = self.forward(params, batch)
    step = self.compiled_step or self.step
    return {
        "step": lambda: jax.block_until_ready(step(params, batch)),
        "forward": lambda: jax.block_until_ready(self.forward(params, batch)),
        "backward": lambda: jax.block_until_ready(self.backward(pullback)),
        "bare": lambda: jax.block_until_ready(self.bare(params, batch)),
    }

  def compile_step(self) -> dict:
    """Compile time of the step and XLA's compile-time memory figures for it.

    The compiled step is kept and used by :meth:`calls` (``jit`` would compile anew).
    """
    start = time.perf_counter()
    compiled = self.step.lower(self.cell.params, self.cell.batch).compile()
    seconds = time.perf_counter() - start
    self.compiled_step = compiled
    memory = compiled.memory_analysis()
    return {"compile_s": seconds,
            "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
            "argument_bytes": int(memory.argument_size_in_bytes) if memory else None,
            "output_bytes": int(memory.output_size_in_bytes) if memory else None}


def build_variant(workload: str, variant: str, forward_iters: int | None = None,
                  seed: int = 0, cell: Cell | None = None) -> Variant:
  """The timed functions of ``variant`` on ``workload``."""
  cell = build_cell(workload, seed) if cell is None else cell
  solver, gradient = solver_and_gradient(workload, variant, forward_iters)
  spec = workloads.workload(workload)
  evaluations, vjps = workloads.evaluation_counts(variant, spec, forward_iters)

  correction = workloads.split_variant(variant)[1] == "correction"

  def loss_and_stats(params, batch, probe=None):
    map_args, z0 = cell.prepare(params, batch["x"])
    if correction:
      states, stats = jdeq.fixed_point_states(
          cell.map, z0, *map_args, solver=solver, grad=gradient, backward_probe=probe,
          indices=jdeq.correction_indices(solver.max_iter, workloads.CORRECTION_STATES))
    else:
      z_star, stats = jdeq.fixed_point(cell.map, z0, *map_args, solver=solver,
                                       grad=gradient, backward_probe=probe)
      states = (z_star,)
    losses = [jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        cell.logits(params, z), batch["labels"])) for z in states]
    if not correction:
      return losses[0], stats
    return jdeq.correction_loss(losses, workloads.CORRECTION_DECAY), stats

  def loss(params, batch):
    return loss_and_stats(params, batch)[0]

  batch_size = jax.tree.leaves(cell.batch["x"])[0].shape[0]

  def step(params, batch):
    # The backward probe costs a few scalars per sample; it lets the timed step
    # itself report the NFE and residuals of both solves (no second compilation).
    probe = jdeq.backward_stats_probe(batch_size)
    (value, stats), (grads, probe_grad) = jax.value_and_grad(
        lambda p, q: loss_and_stats(p, batch, q), argnums=(0, 1), has_aux=True)(
            params, probe)
    updated = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return updated, value, stats, probe_grad

  def bare(params, batch):
    map_args, z0 = cell.prepare(params, batch["x"])
    z = jax.lax.fori_loop(0, evaluations, lambda _, z: cell.map(z, *map_args), z0)
    _, pullback = jax.vjp(lambda z_: cell.map(z_, *map_args), z)
    return jax.lax.fori_loop(0, vjps, lambda _, u: pullback(u)[0], z)

  def counts(step_output):
    _, _, forward_stats, probe_grad = step_output
    result = {
        "forward_evaluations": int(np.max(forward_stats.nstep)),
        "forward_rel_residual": float(np.median(forward_stats.rel_residual)),
        "forward_abs_residual": float(np.median(forward_stats.abs_residual)),
        "diverged": int(np.sum(forward_stats.diverged)),
    }
    if isinstance(gradient, jdeq.IFT):
      backward_stats = jdeq.backward_stats(probe_grad)
      result["backward_vjps"] = int(np.max(backward_stats.nstep))
      result["backward_abs_residual"] = float(np.median(backward_stats.abs_residual))
    return result

  return Variant(
      cell=cell,
      forward=jax.jit(lambda p, b: jax.vjp(lambda p_: loss(p_, b), p)),
      backward=jax.jit(lambda pullback: pullback(jnp.ones((), jnp.float32))),
      step=jax.jit(step), bare=jax.jit(bare), read_counts=counts)


# w3ref: jdeq's registered MDEQ-Tiny recipe (Adam 1e-3, cosine, the model's Broyden
# budgets and tolerance 1e-3), as ``python -m experiments.train`` trains it.
REFERENCE_RECIPE = "mdeq_cifar_tiny"
CIFAR10_TRAIN_IMAGES = 50_000


def _batch_residual(stats: jdeq.SolverStats) -> float:
  """``‖f(z) − z‖ / ‖f(z)‖`` over the whole batch (the reference's stopping quantity).

  (:func:`experiments.reference_parity.main._batch_residual`; that module is not
  imported here, as its import tunes XLA's flags for its own process.)
  """
  absolute = np.asarray(stats.abs_residual, np.float64)
  image = absolute / np.maximum(np.asarray(stats.rel_residual, np.float64), 1e-30)
  return float(np.sqrt(np.sum(absolute**2)) / np.sqrt(np.sum(image**2)))


@dataclasses.dataclass
class TrainingStep:
  """One of the two training steps jdeq's loop runs for MDEQ-Tiny, and its state.

  Attributes:
    kind: ``"equilibrium"`` (Broyden, IFT) or ``"unrolled"`` (pretraining).
    state: the train state; every :meth:`call` advances it, donating its buffers
      as the loop does.
    batch: ``{"image": NHWC images, "label": int32 labels}``.
    step: ``jdeq.train.make_train_step``'s jitted step.
    solves: jitted ``(state, batch) -> (forward, backward)`` SolverStats of one
      equilibrium step (the training step reports no backward statistics); None
      for the unrolled step, which runs no solver.
    compiled: the compiled step (set by :meth:`compile`).
    metrics: the ``StepMetrics`` of the last call.
  """
  kind: str
  state: train_lib.TrainState
  batch: dict
  step: Callable
  solves: Callable | None
  compiled: Callable | None = None
  metrics: Any = None

  def compile(self) -> dict:
    """Compile time of the step and XLA's temporary buffer size for it."""
    start = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch).compile()
    seconds = time.perf_counter() - start
    memory = self.compiled.memory_analysis()
    return {"compile_s": seconds,
            "temp_bytes": int(memory.temp_size_in_bytes) if memory else None}

  def parameter_count(self) -> int:
    """Number of trainable scalars (158,890 for MDEQ-Tiny)."""
    return nn.num_params(self.state.params)

  def call(self) -> None:
    """One training step, blocking until it is done."""
    self.state, self.metrics = jax.block_until_ready(
        (self.compiled or self.step)(self.state, self.batch))

  def counts(self) -> dict:
    """Map evaluations and VJPs of a step at the current state, and the residuals
    (batch-wide, as the reference measures them); one more solve, not timed."""
    if self.solves is None:  # unrolled: the layers of the last step
      return {"forward_evaluations": int(round(float(self.metrics.fwd_nfe))),
              "backward_vjps": None, "forward_rel_residual": None,
              "backward_residual": None}
    forward, backward = jax.device_get(self.solves(self.state, self.batch))
    return {"forward_evaluations": int(np.max(forward.nstep)),
            "backward_vjps": int(np.max(backward.nstep)),
            "forward_rel_residual": _batch_residual(forward),
            "backward_residual": _batch_residual(backward)}


def _solver_stats(state: train_lib.TrainState, batch: dict):
  """Both solves' SolverStats of an equilibrium step: the model's own forward pass
  (``DEQNetwork.__call__``) with a backward-statistics probe through the IFT."""
  images = batch["image"]
  probe = jdeq.backward_stats_probe(images.shape[0], images.dtype)

  def loss(params, probe):
    model = nnx.merge(state.graphdef, params, state.model_state, copy=True)
    injection = model.stem(images, train=True)
    z_star, aux = model.deq(injection, train=True, backward_probe=probe,
                            dropout_key=model.rngs.dropout())
    logits = model.readout(model.refine(z_star, injection, train=True), images,
                           train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])), aux.stats

  (_, forward), (_, probe_grad) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(state.params, probe)
  return forward, jdeq.backward_stats(probe_grad)


def training_step(kind: str, seed: int = 0) -> TrainingStep:
  """MDEQ-Tiny's training step of ``kind``, built as ``jdeq.train.fit`` builds it.

  The registered recipe ``mdeq_cifar_tiny`` gives the model (dropout 0.25,
  Broyden 18/20 steps at tolerance 1e-3, IFT, 10 unrolled layers), the optimizer
  and its schedule; the batch is w3ref's (:func:`workloads.w3_batch`).

  Raises:
    ValueError: for a kind other than ``"equilibrium"`` and ``"unrolled"``.
  """
  if kind not in workloads.REFERENCE_KINDS:
    raise ValueError(f"unknown step kind {kind!r}; valid kinds are "
                     f"{list(workloads.REFERENCE_KINDS)}")
  experiment = configs.get(REFERENCE_RECIPE)
  config = experiment.train
  steps_per_epoch = CIFAR10_TRAIN_IMAGES // experiment.data.batch_size
  schedule = train_lib.make_schedule(config, steps_per_epoch,
                                     config.num_steps(steps_per_epoch))
  optimizer = train_lib.make_optimizer(config, schedule)
  jacobian = train_lib.JacobianSchedule.from_config(config, steps_per_epoch)
  mesh = train_lib.data_mesh()
  model = models.create(experiment_lib.model_config(experiment), rngs=nnx.Rngs(seed))
  state = train_lib.replicate(train_lib.create_train_state(model, optimizer, seed=seed),
                              mesh)
  if kind == "unrolled":  # the loop's pretrain_step
    step = train_lib.make_train_step(optimizer, jacobian, unrolled=True, mesh=mesh)
  else:  # the loop's equilibrium_step
    step = train_lib.make_train_step(optimizer, jacobian, unrolled=False,
                                     regularized=False,
                                     forward_budget=config.forward_budget, mesh=mesh)
  arrays = workloads.w3_batch(seed)
  batch = {"image": jnp.asarray(arrays["x"]), "label": jnp.asarray(arrays["labels"])}
  return TrainingStep(kind=kind, state=state, batch=batch, step=step,
                      solves=None if kind == "unrolled" else jax.jit(_solver_stats))


def backend_started() -> bool:
  """Whether JAX has started a backend (after which XLA flags and threads are fixed).

  JAX has no public query for this, but its public configuration refuses to change
  ``jax_num_cpu_devices`` once a backend exists (a RuntimeError). The probe asks for
  a different value and, where that is accepted (nothing has started, so nothing
  has read the option yet), puts the old value back.
  """
  current = jax.config.jax_num_cpu_devices
  try:
    jax.config.update("jax_num_cpu_devices", current + 2 if current > 0 else 2)
  except RuntimeError:
    return True
  jax.config.update("jax_num_cpu_devices", current)
  return False


def describe_device() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind} ({len(jax.devices())} device(s), jax {jax.__version__})"

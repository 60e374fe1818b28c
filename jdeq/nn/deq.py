"""The NNX equilibrium layer: any cell ``z ↦ cell(z, x)`` becomes ``z* = cell(z*, x)``.

:class:`DEQ` keeps the solver core free of Flax: it splits its cell with
``nnx.split`` into a graph definition and a Param pytree, and hands
``jdeq.fixed_point`` the pure function

    f(z, params, prepared, x) = merge(graphdef, params)(z, x, prepared).

``prepared`` is what the cell's :meth:`EquilibriumCell.prepare` hook computed once
for this forward pass (normalized weights, dropout masks). It is an argument of
``f``, so every solver iteration and the backward pass see the very same arrays, and
the gradient with respect to ``prepared`` flows back to the raw parameters through
that single computation.

The module also writes down the model contract every jdeq model honours and the
training steps rely on (:class:`EquilibriumModel`), and the shell that implements it
for the stem → equilibrium → head models of :mod:`jdeq.models`
(:class:`DEQNetwork`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

import jdeq
from jdeq import AbstractSolver, GradientMode

PyTree = Any


class DEQAux(NamedTuple):
  """Auxiliary outputs of an equilibrium layer (and of the models built on it).

  Attributes:
    stats: the forward :class:`jdeq.SolverStats` (per sample).
    jac_loss: ``(B,)`` Hutchinson estimate of ``‖J_f(z*)‖²_F / d``, zeros when no
      probes were requested.
  """
  stats: jdeq.SolverStats
  jac_loss: jax.Array


@runtime_checkable
class EquilibriumModel(Protocol):
  """The model contract: how the training and evaluation steps call a jdeq model.

  A model is called on a batch of inputs as::

    output, aux = model(x, train=True, unrolled=False, budget=None, jac_probes=0)

  with ``output`` the logits (``(B, K)``, or ``(B, H, W, K)`` for segmentation) and
  ``aux`` a :class:`DEQAux` of per-sample solver statistics and Jacobian penalty.
  Randomness (dropout masks, Hutchinson probes) is drawn from the model's own
  ``nnx.Rngs`` streams, so it is part of the model state and a resumed run draws
  the same. :class:`DEQNetwork` implements the contract for stem → equilibrium →
  head models; any NNX module with this call works with :mod:`jdeq.train`.
  """

  def __call__(self, x: jax.Array, *, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, DEQAux]:
    """One forward pass.

    Args:
      x: a batch of inputs (NHWC images for the models of :mod:`jdeq.models`).
      train: training mode (dropout, batch statistics, the training solver and the
        gradient mode); else evaluation mode (the evaluation solver).
      unrolled: backpropagate through a fixed number of plain iterations of the
        cell instead of solving for the equilibrium ("pretraining").
      budget: optional traced forward budget ``<= solver.max_iter`` (hard stop).
      jac_probes: static number of Hutchinson probes; ``> 0`` fills
        ``aux.jac_loss`` with the estimate of ``‖J_f(z*)‖²_F / d``.

    Returns:
      ``(output, DEQAux(stats, jac_loss))``.
    """
    ...


class EquilibriumCell(nnx.Module):
  """Base class of the cells a :class:`DEQ` solves.

  A cell implements three methods:

  * :meth:`initial_state` — ``z0`` for a given injection (a batched pytree);
  * :meth:`prepare` — everything that must be fixed for the whole solve
    (normalized weights, dropout masks), computed once per forward pass;
  * ``__call__(z, injection, prepared)`` — one application of the map. It must be
    independent across samples and must not mutate the cell (it runs on a
    functional copy, inside solver loops).
  """

  def initial_state(self, injection: PyTree) -> PyTree:
    """The starting point of the solve; zeros shaped like the state by default."""
    return jax.tree.map(jnp.zeros_like, injection)

  def prepare(self, injection: PyTree, *, train: bool,
              key: Optional[jax.Array]) -> PyTree:
    """Arrays shared by all iterations of one forward pass (default: none).

    Args:
      injection: the input injection of this forward pass.
      train: training mode (dropout on, spectral-norm vectors advance).
      key: PRNG key for the dropout masks (None when no randomness is needed).
    """
    del injection, train, key
    return None

  def __call__(self, z: PyTree, injection: PyTree, prepared: PyTree) -> PyTree:
    raise NotImplementedError


def _check_probes(jac_probes: int, jacobian_key: Optional[jax.Array]) -> None:
  if not (isinstance(jac_probes, int) and jac_probes >= 0):
    raise ValueError(f"DEQ: jac_probes must be a non-negative int, got {jac_probes!r}")
  if jac_probes and jacobian_key is None:
    raise ValueError("DEQ: jac_probes > 0 needs a jacobian_key")


def _jacobian_term(f, z, params, prepared, injection, jac_probes: int,
                   jacobian_key: Optional[jax.Array]) -> jax.Array:
  """``(B,)`` Hutchinson estimate of ``‖J_f(z)‖²_F / d`` at a held-fixed ``z`` (0s without probes)."""
  if not jac_probes:
    return jnp.zeros((jax.tree.leaves(z)[0].shape[0],), jnp.float32)
  return jdeq.jacobian_fro_sq(f, jax.lax.stop_gradient(z), params, prepared, injection,
                              key=jacobian_key, num_probes=jac_probes)


def _applied_once_more(f, z_star, grad, *args):
  """``f(z*)`` for ``train_output="f_z_star"``, with IFT's gradient that of ``z*``.

  Under IFT the value is ``f(z*)`` and the tangent is ``z*``'s own
  (``sg(f(z*)) + z* − sg(z*)``, exactly ``f(z*)`` in value), so the backward solve
  takes the output's cotangent as its right-hand side, as the reference's hook does.
  """
  image = f(z_star, *args)
  if not isinstance(grad, jdeq.IFT):
    return image
  return jax.tree.map(lambda fz, z: jax.lax.stop_gradient(fz) + (z - jax.lax.stop_gradient(z)),
                      image, z_star)


#: The choices of :class:`DEQ`'s ``train_output``.
TRAIN_OUTPUTS = ("z_star", "f_z_star")


class DEQ(nnx.Module):
  """An equilibrium layer: solves ``z* = cell(z*, x)`` and differentiates through it.

  Attributes:
    cell: the :class:`EquilibriumCell`.
    solver: forward solver in training mode.
    eval_solver: forward solver in evaluation mode (its own budget/tolerance).
    grad: gradient mode of the equilibrium (``jdeq.IFT`` with its backward solver,
      ``jdeq.Phantom``, ``jdeq.JFB``).
    unrolled_steps: iterations of the "pretraining" mode, which backpropagates
      through ``unrolled_steps`` plain applications of the cell from ``z0``
      (``jdeq.Unrolled``).
    train_output: what a training-mode solve returns: ``"z_star"`` (the solver's
      ``z*``) or ``"f_z_star"``, one more application of the cell,
      ``f(z*)``, with the solve's prepared arrays (weight-normalized kernels,
      dropout masks), as the reference MDEQ and DEQ-Transformer read their
      equilibrium in training. With IFT both have the gradient ``u ∂f/∂θ`` at
      ``z*``, ``u`` from the one backward solve ``u = u J + ∂ℓ/∂out`` — for
      ``f(z*)`` exactly as the reference's backward hook on ``f(z*)`` computes it
      (differentiating through the extra application instead would solve for
      ``∂ℓ/∂out · J``, equal only when the backward solve converges); ``f(z*)``
      differs from ``z*`` by the residual and costs one evaluation more. With
      ``Phantom`` or ``JFB`` the extra application is differentiated like the
      others. Evaluation and the unrolled mode always return their own state.

  In evaluation mode (``train=False``) the layer returns the solver's ``z*``
  itself, whatever ``grad`` is: the extra map evaluations of ``Phantom`` (its ``k``
  damped steps) and ``JFB`` (one step) exist to shape training gradients, and at
  evaluation they would only cost time. An evaluation-mode output that is
  differentiated after all (input gradients, attacks) gets the implicit gradient:
  ``grad`` itself when it is ``IFT``, else ``jdeq.IFT()``.
  """

  def __init__(self, cell: EquilibriumCell, *, solver: AbstractSolver = jdeq.Anderson(),
               eval_solver: Optional[AbstractSolver] = None,
               grad: GradientMode = jdeq.IFT(), unrolled_steps: int = 10,
               train_output: str = "z_star"):
    if not isinstance(cell, EquilibriumCell):
      raise ValueError(f"DEQ: cell must be an EquilibriumCell, got {type(cell).__name__}")
    for name, value in (("solver", solver), ("eval_solver", eval_solver)):
      if value is not None and not isinstance(value, AbstractSolver):
        raise ValueError(f"DEQ: {name} must be a fixed-point solver, got {value!r}")
    if not isinstance(grad, (jdeq.IFT, jdeq.Phantom, jdeq.JFB)):
      raise ValueError(f"DEQ: grad must be IFT, Phantom or JFB (the unrolled mode is "
                       f"the `unrolled` switch), got {grad!r}")
    if not (isinstance(unrolled_steps, int) and unrolled_steps >= 1):
      raise ValueError(f"DEQ: unrolled_steps must be an integer >= 1, got "
                       f"{unrolled_steps!r}")
    if train_output not in TRAIN_OUTPUTS:
      raise ValueError(f"DEQ: train_output must be one of {TRAIN_OUTPUTS}, got "
                       f"{train_output!r}")
    self.cell = cell
    self.solver = solver
    self.eval_solver = solver if eval_solver is None else eval_solver
    self.grad = grad
    self.unrolled_steps = unrolled_steps
    self.train_output = train_output

  def pure_map(self):
    """``(f, params)``: the cell as a pure ``f(z, params, prepared, x)`` and its Params."""
    graphdef, params, rest = nnx.split(self.cell, nnx.Param, ...)

    def f(z, params, prepared, injection):
      return nnx.merge(graphdef, params, rest, copy=True)(z, injection, prepared)

    return f, params

  def __call__(self, injection: PyTree, *, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None, jac_probes: int = 0,
               dropout_key: Optional[jax.Array] = None,
               jacobian_key: Optional[jax.Array] = None,
               backward_probe: Optional[jax.Array] = None) -> tuple[PyTree, DEQAux]:
    """Solves for the equilibrium of the cell driven by ``injection``.

    Args:
      injection: the input injection ``x`` (a batched pytree).
      train: use the training solver, the gradient mode and dropout masks; else
        the evaluation solver, no dropout, and ``z*`` as the output (see above).
      unrolled: backpropagate through ``unrolled_steps`` plain iterations instead
        of solving (pretraining mode; ``budget`` is then ignored).
      budget: optional traced forward budget ``<= solver.max_iter``.
      jac_probes: static number of Hutchinson probes; ``> 0`` estimates
        ``‖J_f(z*)‖²_F / d`` at the equilibrium (differentiable in the parameters,
        with ``z*`` held fixed as in the reference implementation).
      dropout_key: key for the cell's dropout masks (training only).
      jacobian_key: key for the Hutchinson probes (needed when ``jac_probes > 0``).
      backward_probe: optional :func:`jdeq.backward_stats_probe`, passed to
        :func:`jdeq.fixed_point` (its gradient holds the IFT backward statistics).

    Returns:
      ``(z_star, DEQAux(stats, jac_loss))`` (``f(z*)`` in place of ``z*`` when
      training with ``train_output="f_z_star"``; the statistics and the Jacobian
      term are those of the solver's ``z*``).
    """
    _check_probes(jac_probes, jacobian_key)
    prepared = self.cell.prepare(injection, train=train, key=dropout_key)
    z0 = self.cell.initial_state(injection)
    f, params = self.pure_map()
    if unrolled:
      grad = jdeq.Unrolled(self.unrolled_steps)
    elif train or isinstance(self.grad, jdeq.IFT):
      grad = self.grad
    else:
      grad = jdeq.IFT()
    solver = self.solver if train else self.eval_solver
    z_star, stats = jdeq.fixed_point(f, z0, params, prepared, injection,
                                     solver=solver, grad=grad, budget=budget,
                                     backward_probe=backward_probe)
    jac_loss = _jacobian_term(f, z_star, params, prepared, injection, jac_probes,
                              jacobian_key)
    if train and not unrolled and self.train_output == "f_z_star":
      z_star = _applied_once_more(f, z_star, grad, params, prepared, injection)
    return z_star, DEQAux(stats, jac_loss)

  def fixed_point_states(self, injection: PyTree, *, indices: Sequence[int],
                         grad: Any = None, train: bool = True,
                         budget: Optional[jax.Array] = None, jac_probes: int = 0,
                         dropout_key: Optional[jax.Array] = None,
                         jacobian_key: Optional[jax.Array] = None
                         ) -> tuple[tuple[PyTree, ...], DEQAux]:
    """Differentiable states of one solve, for fixed-point correction.

    The layer's counterpart of :func:`jdeq.fixed_point_states`: the states after
    ``indices[j]`` solver evaluations, each with its own gradient, to be scored by
    the head and combined with :func:`jdeq.correction_loss`. :meth:`__call__` is
    unchanged; this is a second entry point.

    Args:
      injection: the input injection ``x`` (a batched pytree).
      indices: static, strictly increasing evaluation counts in
        ``[1, solver.max_iter]`` (e.g. ``jdeq.correction_indices(max_iter, n)``).
      grad: one gradient mode for every state or one per state (see
        :func:`jdeq.fixed_point_states`). ``None``: the layer's ``grad`` for every
        state when it is ``Phantom`` or ``JFB``; when it is ``IFT``, ``JFB`` for the
        intermediate states and the layer's ``IFT`` for the last (TorchDEQ's
        ``ift=True`` with its default one-step ``grad=1``).
      train: use the training solver and dropout masks, else the evaluation solver
        (the gradient modes apply in both).
      budget: optional traced forward budget ``<= solver.max_iter``.
      jac_probes: static number of Hutchinson probes, estimated at the last state.
      dropout_key: key for the cell's dropout masks (training only).
      jacobian_key: key for the Hutchinson probes (needed when ``jac_probes > 0``).

    Returns:
      ``(states, DEQAux(stats, jac_loss))`` with ``states`` a tuple of
      ``len(indices)`` pytrees like the state, the last one the final estimate.
    """
    _check_probes(jac_probes, jacobian_key)
    if grad is None:
      grad = self.grad
      if isinstance(grad, jdeq.IFT) and isinstance(indices, (tuple, list)):
        grad = (jdeq.JFB(),) * (len(indices) - 1) + (grad,)
    prepared = self.cell.prepare(injection, train=train, key=dropout_key)
    z0 = self.cell.initial_state(injection)
    f, params = self.pure_map()
    solver = self.solver if train else self.eval_solver
    states, stats = jdeq.fixed_point_states(
        f, z0, params, prepared, injection, indices=indices, solver=solver,
        grad=grad, budget=budget)
    jac_loss = _jacobian_term(f, states[-1], params, prepared, injection, jac_probes,
                              jacobian_key)
    return states, DEQAux(stats, jac_loss)

  def call_with_rngs(self, injection: PyTree, rngs: nnx.Rngs, *, train: bool,
                     unrolled: bool, budget: Optional[jax.Array], jac_probes: int,
                     uses_dropout: bool) -> tuple[PyTree, DEQAux]:
    """:meth:`__call__` with its keys drawn from a model's ``nnx.Rngs`` streams.

    The ``dropout`` stream is drawn only when training a cell with dropout and the
    ``jacobian`` stream only when probes are requested, so a model's randomness
    (and thus a resumed run) does not depend on unused draws.
    """
    dropout_key = rngs.dropout() if train and uses_dropout else None
    jacobian_key = rngs.jacobian() if jac_probes else None
    return self(injection, train=train, unrolled=unrolled, budget=budget,
                jac_probes=jac_probes, dropout_key=dropout_key,
                jacobian_key=jacobian_key)


class DEQNetwork(nnx.Module):
  """``stem`` → ``deq`` (a :class:`DEQ` around ``cell``) → ``head``: the model contract
  (:class:`EquilibriumModel`) implemented once for the models of :mod:`jdeq.models`.

  The input ``x`` is mapped to the injection by ``stem(x, train=)``, the cell's
  equilibrium ``z*`` is solved for (keys drawn from the model's ``nnx.Rngs``, see
  :meth:`DEQ.call_with_rngs`) and ``head(z*, train=)`` gives the output. Models
  customize the input check (:meth:`check_input`), what happens to ``z*`` before the
  head (:meth:`refine`) and the head call (:meth:`readout`).

  Attributes:
    config: the model configuration; it provides ``solver``, ``eval_solver``,
      ``grad``, ``unrolled_steps`` and optionally ``train_output`` of the
      :class:`DEQ`.
    stem, deq, head: the three stages.
    rngs: the model's RNG streams (``"dropout"``, ``"jacobian"``).
  """

  def __init__(self, config: Any, stem: nnx.Module, cell: EquilibriumCell,
               head: nnx.Module, *, rngs: nnx.Rngs,
               input_shape: Optional[Sequence[int]] = None,
               cell_dropout: bool = False):
    """Assembles the model (the stages are built by the caller, in that order).

    Args:
      config: the model configuration (see above).
      stem: ``stem(x, *, train) -> injection``.
      cell: the :class:`EquilibriumCell` of the equilibrium layer.
      head: ``head(z_star, *, train) -> output``.
      rngs: the model's RNG streams.
      input_shape: the per-sample input shape :meth:`check_input` requires (None:
        no check).
      cell_dropout: whether the cell draws dropout masks in training.
    """
    self.config = config
    self.stem = stem
    self.deq = DEQ(cell, solver=config.solver, eval_solver=config.eval_solver,
                   grad=config.grad, unrolled_steps=config.unrolled_steps,
                   train_output=getattr(config, "train_output", "z_star"))
    self.head = head
    self.rngs = rngs
    self.input_shape = None if input_shape is None else tuple(input_shape)
    self.cell_dropout = cell_dropout

  def check_input(self, x: jax.Array) -> None:
    """Raises a ValueError unless ``x`` is a batch of ``input_shape`` inputs."""
    if self.input_shape is not None and (
        x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape):
      raise ValueError(f"{type(self).__name__} ({type(self.config).__name__}) expected "
                       f"images of shape (B, {', '.join(map(str, self.input_shape))}), "
                       f"got {tuple(x.shape)}")

  def refine(self, z_star: PyTree, injection: PyTree, *, train: bool) -> PyTree:
    """What the head sees of the equilibrium (default: ``z*`` itself)."""
    del injection, train
    return z_star

  def readout(self, z_star: PyTree, x: jax.Array, *, train: bool) -> jax.Array:
    """The head's output for the equilibrium of input ``x``."""
    del x
    return self.head(z_star, train=train)

  def __call__(self, x: jax.Array, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, DEQAux]:
    """The model contract (see :class:`EquilibriumModel`)."""
    self.check_input(x)
    injection = self.stem(x, train=train)
    z_star, aux = self.deq.call_with_rngs(
        injection, self.rngs, train=train, unrolled=unrolled, budget=budget,
        jac_probes=jac_probes, uses_dropout=self.cell_dropout)
    z_star = self.refine(z_star, injection, train=train)
    return self.readout(z_star, x, train=train), aux

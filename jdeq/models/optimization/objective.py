r"""Cells defined by a hidden objective: one proximal-gradient step per layer.

An *optimization-induced* cell (Xie et al., OptEq; Li et al., MOptEqs, GEQ) is
described by a composite objective over the state ``z``

  G(z) = φ(z) + G_s(z),

with ``φ`` convex and non-smooth, and ``G_s`` smooth. The cell's update is one
proximal-gradient step with unit step size,

  T(z) = prox_φ(z − ∇G_s(z)),

so ``z* = T(z*)`` exactly when ``0 ∈ ∂φ(z*) + ∇G_s(z*)``: the cell's fixed points are
the stationary points of ``G`` (its minimizers when ``G`` is convex). Here ``φ`` is the
indicator of the non-negative orthant, whose proximal map is ReLU.

An :class:`Objective` is a frozen, hashable description holding only static
hyperparameters; the arrays it needs (normalized weights, injections, kernel widths)
come in the ``operators`` pytree built once per forward pass by the owning
:class:`OptimizationCell` (a :class:`jdeq.nn.EquilibriumCell`). Its :meth:`Objective.update` is therefore a pure function
``f(z, operators)`` that :func:`jdeq.fixed_point` can solve and differentiate.
All reductions are per sample (:func:`jdeq.per_sample_sum` and its kin): states carry a leading batch axis and every scalar
the objective returns has shape ``(B,)``.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jdeq import per_sample_norm, per_sample_sum
from jdeq.nn import EquilibriumCell

PyTree = Any


class Objective(abc.ABC):
  """``G = ι_{z ≥ 0} + G_s``; subclasses define ``G_s`` and its gradient.

  Subclasses must be hashable (frozen dataclasses) and read arrays only from the
  ``operators`` argument, never from module state.
  """

  @abc.abstractmethod
  def smooth_value(self, z: PyTree, operators: PyTree) -> jax.Array:
    """``G_s(z)`` per sample, shape ``(B,)``."""

  @abc.abstractmethod
  def smooth_gradient(self, z: PyTree, operators: PyTree) -> PyTree:
    """``∇G_s(z)``, a pytree like ``z`` (closed form; tested against autodiff)."""

  def value(self, z: PyTree, operators: PyTree) -> jax.Array:
    """``G(z) = ι_{z ≥ 0}(z) + G_s(z)`` per sample (``+inf`` where ``z`` is infeasible)."""
    infeasible = per_sample_sum(jax.tree.map(lambda leaf: leaf < 0, z)) > 0
    return jnp.where(infeasible, jnp.inf, self.smooth_value(z, operators))

  def update(self, z: PyTree, operators: PyTree) -> PyTree:
    """``T(z) = ReLU(z − ∇G_s(z))``, the cell map (unit step size)."""
    gradient = self.smooth_gradient(z, operators)
    return jax.tree.map(lambda zi, gi: jax.nn.relu(zi - gi), z, gradient)

  def prox_residual(self, z: PyTree, operators: PyTree) -> jax.Array:
    """``‖z − T(z)‖`` per sample: the proximal-gradient mapping, zero iff stationary."""
    step = self.update(z, operators)
    return per_sample_norm(jax.tree.map(jnp.subtract, z, step))

  def stationarity(self, z: PyTree, operators: PyTree) -> jax.Array:
    """``dist(−∇G_s(z), N(z))`` per sample, for feasible ``z`` (``z ≥ 0``).

    ``N(z)`` is the normal cone of the orthant: ``{0}`` on coordinates with
    ``z_i > 0`` and ``(−∞, 0]`` where ``z_i = 0``. The distance is ``|g_i|`` on the
    first and ``max(−g_i, 0)`` on the second, with ``g = ∇G_s(z)``; it is zero exactly
    at the minimizers of a convex ``G``. ``z`` is projected onto the orthant first.
    """
    z = jax.tree.map(jax.nn.relu, z)
    gradient = self.smooth_gradient(z, operators)
    violation = jax.tree.map(
        lambda zi, gi: jnp.where(zi > 0, gi, jax.nn.relu(-gi)), z, gradient)
    return per_sample_norm(violation)


class OptimizationCell(EquilibriumCell):
  """An equilibrium cell whose map is :meth:`Objective.update` of its objective.

  Subclasses set ``self.objective_spec`` and implement :meth:`operators` (the arrays
  the objective needs for the input features ``x``) and :meth:`initial_state`.
  As a :class:`jdeq.nn.EquilibriumCell`, :meth:`prepare` builds the operators once
  per forward pass and ``__call__(z, x, prepared)`` applies ``T``; the evaluation
  methods below take ``x`` and build the operators themselves.
  """

  objective_spec: Objective

  @abc.abstractmethod
  def operators(self, x: jax.Array) -> PyTree:
    """Normalized weights and input-dependent terms for the features ``x``."""

  def prepare(self, injection: jax.Array, *, train: bool,
              key: Optional[jax.Array]) -> PyTree:
    """The operators, fixed for a whole solve (no randomness inside the cell)."""
    del train, key
    return self.operators(injection)

  def __call__(self, z: PyTree, x: jax.Array, prepared: Optional[PyTree] = None
               ) -> PyTree:
    """``T(z)`` for input ``x`` (``prepared``: operators from :meth:`prepare`)."""
    operators = self.operators(x) if prepared is None else prepared
    return self.objective_spec.update(z, operators)

  def objective(self, z: PyTree, x: jax.Array) -> jax.Array:
    """``G(z; x)`` per sample."""
    return self.objective_spec.value(z, self.operators(x))

  def prox_residual(self, z: PyTree, x: jax.Array) -> jax.Array:
    """``‖z − T(z)‖`` per sample."""
    return self.objective_spec.prox_residual(z, self.operators(x))

  def stationarity(self, z: PyTree, x: jax.Array) -> jax.Array:
    """``dist(−∇G_s(z), N(z))`` per sample."""
    return self.objective_spec.stationarity(z, self.operators(x))

  def perturb(self, z: PyTree, operators: PyTree, *, key: jax.Array,
              size: float) -> PyTree:
    """The perturbation strategy: ``T(z + δ)`` with ``‖δ_i‖ = size · ‖z_i‖`` per sample.

    ``δ_i`` is Gaussian noise rescaled, per sample and per leaf (branch), to a
    fraction ``size`` (ε) of that leaf's norm; one more proximal-gradient step then
    pulls the perturbed point back toward the minimizer (for a strongly convex
    ``G`` the step contracts the error). The head is thereby trained on points of
    the objective's basin around ``z*`` rather than on ``z*`` alone: our reading of
    MOptEqs' objective-motivated perturbation (docs/optimization_cells.md).
    """
    leaves, treedef = jax.tree.flatten(z)
    keys = jax.random.split(key, len(leaves))
    perturbed = []
    for zi, ki in zip(leaves, keys):
      noise = jax.random.normal(ki, zi.shape, zi.dtype)
      scale = size * per_sample_norm(jax.lax.stop_gradient(zi)) / (
          per_sample_norm(noise) + jnp.finfo(zi.dtype).tiny)
      scale = scale.reshape((-1,) + (1,) * (zi.ndim - 1))
      perturbed.append(zi + scale * noise)
    return self.objective_spec.update(treedef.unflatten(perturbed), operators)

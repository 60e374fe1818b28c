"""The Jacobian-regularization schedule (Bai, Koltun & Kolter, "Stabilizing Equilibrium
Models by Jacobian Regularization", ICML 2021).

The training loss on a step ``t`` is

  L = L_task + τ_t · γ(t) · ‖J‖²_F / d,     τ_t ~ Bernoulli(p),

with the Hutchinson estimate of ``‖J‖²_F / d`` computed by the model at ``z*``, and

  γ(t) = γ₀ + Δγ · ⌊t / K⌋   while  t < stop_epoch · steps_per_epoch,   else 0.

On regularized steps the forward budget is jittered by a small random integer, as in
the reference code, so the model does not learn to converge at one exact budget.
Every quantity here is a function of the step and an explicit key, so the draws
replay exactly after a resume; the decisions τ_t can also be drawn for the whole
run up front (:meth:`JacobianSchedule.regularized_steps`), which lets the training
loop pick a separately compiled regularized step without a host sync per step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdeq.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class JacobianSchedule:
  """γ(t), the regularization draw and the budget jitter (hashable, jit-static).

  Attributes:
    gamma: γ₀.
    prob: p.
    increment: Δγ.
    increment_every: K in steps (0: no increments).
    stop_step: first step with γ = 0 (None: never).
    probes: Hutchinson probes M.
    budget_jitter: the half-width of the forward-budget jitter on regularized steps.
  """
  gamma: float = 0.0
  prob: float = 1.0
  increment: float = 0.0
  increment_every: int = 0
  stop_step: Optional[int] = None
  probes: int = 1
  budget_jitter: int = 0

  @classmethod
  def from_config(cls, config: TrainConfig,
                  steps_per_epoch: int) -> "JacobianSchedule":
    stop = (None if config.jac_stop_epoch is None
            else round(config.jac_stop_epoch * steps_per_epoch))
    return cls(gamma=config.jac_gamma, prob=config.jac_prob,
               increment=config.jac_gamma_increment,
               increment_every=config.jac_increment_every, stop_step=stop,
               probes=config.jac_probes, budget_jitter=config.jac_budget_jitter)

  @property
  def enabled(self) -> bool:
    """Whether any step can be regularized (else the step skips the branch)."""
    can_be_positive = self.gamma > 0 or (self.increment > 0 and
                                         self.increment_every > 0)
    return can_be_positive and self.prob > 0 and self.stop_step != 0

  def gamma_at(self, step: jax.Array) -> jax.Array:
    """γ(t) as a float32 scalar."""
    step = jnp.asarray(step, jnp.int32)
    gamma = jnp.asarray(self.gamma, jnp.float32)
    if self.increment_every > 0:
      gamma = gamma + self.increment * (step // self.increment_every)
    if self.stop_step is not None:
      gamma = jnp.where(step < self.stop_step, gamma, 0.0)
    return gamma

  def draw(self, key: jax.Array, step: jax.Array,
           regularize: Optional[bool] = None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(regularize, gamma, jitter)`` for one step.

    ``regularize`` is ``τ ∧ γ(t) > 0`` (or the given decision, when the caller has
    drawn it beforehand with :meth:`regularized_steps`); ``jitter`` is the int32
    offset of the step's forward budget: ``u`` uniform in
    ``[-budget_jitter, budget_jitter]`` on a regularized step, else 0 (see
    :meth:`budget`).
    """
    draw_key, jitter_key = jax.random.split(key)
    gamma = self.gamma_at(step)
    if regularize is None:
      regularize = jax.random.bernoulli(draw_key, self.prob) & (gamma > 0)
    else:
      regularize = jnp.asarray(regularize)
    jitter = jnp.zeros((), jnp.int32)
    if self.budget_jitter > 0:
      offset = jax.random.randint(jitter_key, (), -self.budget_jitter,
                                  self.budget_jitter + 1)
      jitter = jnp.where(regularize, offset, 0)
    return regularize, gamma, jitter

  @staticmethod
  def budget(forward_budget: Optional[int],
             jitter: jax.Array) -> Optional[jax.Array]:
    """The int32 forward budget ``max(forward_budget + jitter, 1)`` (None: the
    model's own budget, which is never jittered)."""
    if forward_budget is None:
      return None
    return jnp.maximum(jnp.asarray(forward_budget, jnp.int32) + jitter, 1)

  def regularized_steps(self, rng: jax.Array, num_steps: int) -> np.ndarray:
    """The decisions ``τ_t ∧ γ(t) > 0`` for steps ``0 … num_steps − 1``, on the host.

    They are the draws the train step makes with key ``fold_in(rng, t)``, computed
    in one call before training, so that a loop can run a separately compiled
    regularized step without a host sync per step.
    """
    if not self.enabled:
      return np.zeros(num_steps, bool)
    decide = jax.jit(jax.vmap(
        lambda t: self.draw(jax.random.fold_in(rng, t), t)[0]))
    return np.asarray(jax.device_get(decide(jnp.arange(num_steps, dtype=jnp.int32))))

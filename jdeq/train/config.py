"""The training configuration: optimizer, schedule, length, regularization, bookkeeping."""

from __future__ import annotations

import math
from typing import Optional

from jdeq import config, require, require_choice, require_positive

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@config
class TrainConfig:
  """Everything the training loop needs besides the model and the data.

  The batch size is not here: it belongs to the data configuration
  (``jdeq.data.DataConfig.batch_size``), which produces the batches; one source of
  truth avoids the two disagreeing.

  Attributes:
    optimizer: ``"sgd"`` (heavy-ball momentum), ``"nesterov"``, ``"adam"`` or
      ``"adamw"``.
    lr: peak learning rate.
    momentum: momentum of sgd/nesterov (``b1`` is Adam's own default).
    weight_decay: for adamw the decoupled decay ``θ ← θ − lr·wd·θ``; for the others
      the coupled L2 term ``wd·θ`` added to the gradient (PyTorch's
      ``weight_decay``, which the reference code uses).
    schedule: ``"cosine"`` (``lr·½(1 + cos(π t/T))``, stepped per iteration, T the
      steps after warmup), ``"step"`` (multiplied by ``decay_factor`` at each of
      ``decay_epochs``) or ``"constant"``.
    decay_epochs: epochs at which the step schedule decays.
    decay_factor: the step schedule's multiplier.
    warmup_steps: linear warmup from 0 to ``lr`` over this many steps.
    grad_clip_norm: clip the global gradient norm to this value (None: no clip).
    epochs: training length in epochs (fractional allowed); exactly one of
      ``epochs`` and ``total_steps`` must be given.
    total_steps: training length in optimizer steps.
    pretrain_steps: the first steps train in the unrolled ("pretraining") mode,
      ordinary backprop through the cell, before switching to equilibrium mode.
    jac_gamma: Jacobian regularization weight γ₀ (Bai, Koltun & Kolter,
      ICML 2021); 0 disables it.
    jac_prob: probability p that a step is regularized (τ ~ Bernoulli(p)).
    jac_gamma_increment: γ grows by this amount every ``jac_increment_every`` steps.
    jac_increment_every: K, the increment period in steps (0: γ stays constant).
    jac_stop_epoch: from this epoch on γ = 0 (None: never stops).
    jac_probes: Hutchinson probes M per regularized step.
    forward_budget: hard-stopped forward budget of the equilibrium solve in
      training (None: the model's own ``max_iter``).
    jac_budget_jitter: on regularized steps the forward budget is
      ``forward_budget + u``, ``u`` uniform in ``[-jitter, jitter]`` and at least 1;
      needs ``forward_budget``.
    seed: seed of the model's initialization and of the training key (the
      regularization draws and budget jitter).
    log_every: steps between metric logs (the only host synchronizations).
    eval_every: steps between test evaluations (None: at the end only).
    checkpoint_every: steps between checkpoints (None: at the end only).
    keep_last_k: checkpoints kept on disk.
    max_minutes: wall-clock budget; the run stops cleanly at the first step past
      it, checkpoints, evaluates and reports.
    max_eval_batches: evaluate on at most this many test batches (None: all).
  """
  optimizer: str = "adam"
  lr: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = "cosine"
  decay_epochs: tuple = ()
  decay_factor: float = 0.1
  warmup_steps: int = 0
  grad_clip_norm: Optional[float] = None
  epochs: Optional[float] = None
  total_steps: Optional[int] = None
  pretrain_steps: int = 0
  jac_gamma: float = 0.0
  jac_prob: float = 1.0
  jac_gamma_increment: float = 0.0
  jac_increment_every: int = 0
  jac_stop_epoch: Optional[float] = None
  jac_probes: int = 1
  forward_budget: Optional[int] = None
  jac_budget_jitter: int = 0
  seed: int = 0
  log_every: int = 50
  eval_every: Optional[int] = None
  checkpoint_every: Optional[int] = 500
  keep_last_k: int = 3
  max_minutes: Optional[float] = None
  max_eval_batches: Optional[int] = None

  def __post_init__(self) -> None:
    require_choice(self, "optimizer", self.optimizer, OPTIMIZERS)
    require_choice(self, "schedule", self.schedule, SCHEDULES)
    require_positive(self, lr=self.lr, log_every=self.log_every,
                     keep_last_k=self.keep_last_k, jac_probes=self.jac_probes)
    require(0 <= self.momentum < 1, self,
            f"momentum must be in [0, 1), got {self.momentum!r}")
    require(self.weight_decay >= 0, self,
            f"weight_decay must be >= 0, got {self.weight_decay!r}")
    require((self.epochs is None) != (self.total_steps is None), self,
            "give exactly one of epochs and total_steps, got "
            f"epochs={self.epochs!r}, total_steps={self.total_steps!r}")
    if self.epochs is not None:
      require_positive(self, epochs=self.epochs)
    if self.total_steps is not None:
      require_positive(self, total_steps=self.total_steps)
    require(isinstance(self.decay_epochs, tuple), self,
            f"decay_epochs must be a tuple, got {self.decay_epochs!r}")
    require(0 < self.decay_factor <= 1, self,
            f"decay_factor must be in (0, 1], got {self.decay_factor!r}")
    for name in ("warmup_steps", "pretrain_steps", "jac_increment_every",
                 "jac_budget_jitter"):
      value = getattr(self, name)
      require(isinstance(value, int) and value >= 0, self,
              f"{name} must be an integer >= 0, got {value!r}")
    if self.grad_clip_norm is not None:
      require_positive(self, grad_clip_norm=self.grad_clip_norm)
    require(self.jac_gamma >= 0 and self.jac_gamma_increment >= 0, self,
            "jac_gamma and jac_gamma_increment must be >= 0")
    require(0 <= self.jac_prob <= 1, self,
            f"jac_prob must be in [0, 1], got {self.jac_prob!r}")
    if self.forward_budget is not None:
      require(isinstance(self.forward_budget, int) and self.forward_budget >= 1,
              self, f"forward_budget must be an integer >= 1, got "
              f"{self.forward_budget!r}")
    require(self.jac_budget_jitter == 0 or self.forward_budget is not None, self,
            "jac_budget_jitter needs forward_budget (the budget it jitters)")
    for name in ("eval_every", "checkpoint_every", "max_eval_batches"):
      value = getattr(self, name)
      require(value is None or (isinstance(value, int) and value >= 1), self,
              f"{name} must be None or an integer >= 1, got {value!r}")
    if self.max_minutes is not None:
      require_positive(self, max_minutes=self.max_minutes)

  def num_steps(self, steps_per_epoch: int) -> int:
    """The training length in optimizer steps."""
    if self.total_steps is not None:
      return self.total_steps
    return max(1, math.ceil(self.epochs * steps_per_epoch))

"""Optax optimizers and learning-rate schedules built from a :class:`TrainConfig`."""

from __future__ import annotations

from typing import Optional, Union

import optax

from jdeq.train.config import TrainConfig


def make_schedule(config: TrainConfig, steps_per_epoch: int,
                  total_steps: Optional[int] = None) -> optax.Schedule:
  """The learning rate as a function of the optimizer step.

  Cosine: ``η(t) = η₀ · ½(1 + cos(π (t − w)/(T − w)))`` after a linear warmup of
  ``w`` steps, evaluated every iteration (not per epoch). Step: ``η₀ · f^k`` with
  ``k`` the number of ``decay_epochs`` already passed. Constant: ``η₀``. Warmup,
  when set, ramps linearly from 0 for every schedule.

  Args:
    config: the training configuration.
    steps_per_epoch: converts the epoch-based settings to steps.
    total_steps: ``T``, the run's length as the caller resolved it (default:
      ``config.num_steps(steps_per_epoch)``).
  """
  total = config.num_steps(steps_per_epoch) if total_steps is None else total_steps
  warmup = min(config.warmup_steps, total - 1)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
  elif config.schedule == "step":
    boundaries = {max(1, round(epoch * steps_per_epoch)) - warmup: config.decay_factor
                  for epoch in config.decay_epochs}
    main = optax.piecewise_constant_schedule(config.lr, boundaries)
  else:
    main = optax.constant_schedule(config.lr)
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, config.lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config: TrainConfig,
                   schedule: Union[optax.Schedule, int]) -> optax.GradientTransformation:
  """Gradient clipping → (coupled L2) → the optimizer with its schedule.

  Args:
    config: the training configuration.
    schedule: the learning-rate schedule (:func:`make_schedule`), or the steps per
      epoch to build it from.
  """
  if not callable(schedule):
    schedule = make_schedule(config, schedule)
  chain = []
  if config.grad_clip_norm is not None:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay and config.optimizer != "adamw":
    chain.append(optax.add_decayed_weights(config.weight_decay))
  if config.optimizer == "sgd":
    chain.append(optax.sgd(schedule, momentum=config.momentum or None))
  elif config.optimizer == "nesterov":
    chain.append(optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  elif config.optimizer == "adam":
    chain.append(optax.adam(schedule))
  else:
    chain.append(optax.adamw(schedule, weight_decay=config.weight_decay))
  return optax.chain(*chain)

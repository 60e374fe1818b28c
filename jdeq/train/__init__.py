"""Training: configuration, optax setup, jitted steps, checkpoints, the loop.

A run is ``fit(model, TrainConfig(...), train_batches=..., eval_batches=...,
steps_per_epoch=..., workdir=...)``; the pieces are public for custom loops.
"""

from jdeq.train.budgets import budget_sweep, restore_state
from jdeq.train.checkpoint import CheckpointError, Checkpointer
from jdeq.train.config import TrainConfig
from jdeq.train.experiment import (ExperimentConfig, apply_overrides,
                                   finished_report, model_config, parse_override,
                                   run_experiment)
from jdeq.train.loop import evaluate, fit
from jdeq.train.metrics import EvalSums, StepMetrics, classification_sums
from jdeq.train.optim import make_optimizer, make_schedule
from jdeq.train.regularization import JacobianSchedule
from jdeq.train.sharding import data_mesh, replicate, shard_batch
from jdeq.train.state import TrainState, create_train_state, num_params
from jdeq.train.steps import make_eval_step, make_train_step

__all__ = (
    "CheckpointError", "Checkpointer", "budget_sweep", "restore_state", "EvalSums", "ExperimentConfig",
    "JacobianSchedule", "apply_overrides", "model_config", "parse_override",
    "finished_report", "run_experiment",
    "StepMetrics", "TrainConfig", "TrainState", "classification_sums",
    "create_train_state", "data_mesh", "evaluate", "fit", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "num_params",
    "replicate", "shard_batch",
)

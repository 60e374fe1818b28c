"""Training: configuration, optax setup, jitted steps, checkpoints, the loop.

A run is ``fit(model, TrainConfig(...), train_batches=..., eval_batches=...,
steps_per_epoch=..., workdir=...)``; the pieces are public for custom loops. This
package knows neither data pipelines nor models: it relies on the batch contract
and on the model contract (:class:`jdeq.nn.EquilibriumModel`). Experiments, which
put a model, data and training together, live in :mod:`jdeq.experiment`.
"""

from jdeq.train import distributed
from jdeq.train.budgets import budget_sweep, restore_state
from jdeq.train.checkpoint import CheckpointError, Checkpointer
from jdeq.train.config import TrainConfig
from jdeq.train.loop import evaluate, fit
from jdeq.train.metrics import EvalSums, StepMetrics, classification_sums
from jdeq.train.optim import make_optimizer, make_schedule
from jdeq.train.regularization import JacobianSchedule
from jdeq.train.sharding import data_mesh, replicate, shard_batch
from jdeq.train.state import TrainState, create_train_state
from jdeq.train.steps import make_eval_step, make_train_step
from jdeq.train.tasks import Classification, LanguageModeling, Task, TaskOutput

__all__ = (
    "CheckpointError", "Checkpointer", "Classification", "EvalSums",
    "JacobianSchedule", "LanguageModeling", "StepMetrics", "Task", "TaskOutput",
    "TrainConfig", "TrainState", "budget_sweep", "classification_sums", "distributed",
    "create_train_state", "data_mesh", "evaluate", "fit", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "replicate",
    "restore_state", "shard_batch",
)

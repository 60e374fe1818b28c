"""The functional train state: an NNX model split into a static graph and arrays."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  The model is kept split (``nnx.split(model, nnx.Param, ...)``): the graph
  definition is static (part of the pytree's structure, so it is hashed by ``jit``
  rather than traced), the parameters are what the optimizer updates, and
  ``model_state`` holds every other variable, in particular the model's ``nnx.Rngs``
  streams (dropout masks, Hutchinson probes) and any batch statistics. Keeping the
  RNG streams here is what makes a resumed run draw the same randomness.

  Attributes:
    graphdef: the model's static graph definition.
    params: the ``nnx.Param`` variables.
    model_state: all other model variables.
    opt_state: the optax state.
    step: int32 scalar, optimizer steps taken.
    rng: the training key; step ``t`` uses ``fold_in(rng, t)`` (regularization draw,
      budget jitter), so no key needs to be threaded from step to step.
    carry: what the task carries from one training batch to the next (a language
      model's segment memory; None for classification), checkpointed with the
      rest so that a resumed run continues exactly.
  """
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  params: Any
  model_state: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  carry: Any = None

  def model(self) -> nnx.Module:
    """A fresh NNX module holding the current parameters and state."""
    return nnx.merge(self.graphdef, self.params, self.model_state, copy=True)


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                       *, seed: int, carry: Any = None) -> TrainState:
  """Splits ``model`` and initializes the optimizer; the model is not modified.

  ``carry`` is the task's initial carry (see :class:`jdeq.train.tasks.Task`).
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return TrainState(graphdef=graphdef, params=params, model_state=model_state,
                    opt_state=optimizer.init(params),
                    step=jax.numpy.zeros((), jax.numpy.int32),
                    rng=jax.random.key(seed), carry=carry)


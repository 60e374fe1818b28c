"""Bad inputs to the public API and the CLI: each is named in an error, or is data.

Non-finite numbers are data (the solve flags the sample, the training step skips
its update and counts it); everything else is refused before any computation,
with a message that names the problem.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from experiments import configs
from experiments import train as cli
from jdeq import experiment as experiment_lib
from jdeq import train
from jdeq.train import metrics as metrics_lib
from jdeq.train import testing

IMAGE_SHAPE = (4, 4, 1)


def _cell(z, w, x):
  return jnp.tanh(z @ w + x)


_W = 0.5 * jnp.eye(3)


# --- the solve --------------------------------------------------------------------

def test_nonfinite_input_is_flagged_per_sample():
  """A NaN input row diverges at once; tanh maps an infinite one to a finite value,
  which is then just data; the clean row is unaffected."""
  x = jnp.array([[0.3, -0.2, 0.5], [jnp.nan, 0.0, 0.0], [jnp.inf, 0.0, 0.0]])
  z, stats = jdeq.fixed_point(_cell, jnp.zeros_like(x), _W, x,
                              solver=jdeq.Anderson(30, 1e-5))
  np.testing.assert_array_equal(stats.diverged, [False, True, False])
  np.testing.assert_array_equal(stats.converged, [True, False, True])
  assert int(stats.nstep[1]) == 1  # stopped at the first evaluation
  assert np.all(np.isfinite(z))   # the NaN sample keeps its (finite) start


def test_integer_z0_is_refused():
  with pytest.raises(ValueError, match="z0 must be floating point"):
    jdeq.fixed_point(_cell, jnp.zeros((2, 3), jnp.int32), _W, jnp.ones((2, 3)))


def test_z0_of_another_dtype_than_the_map_is_named(x64):
  x = jnp.ones((2, 3), jnp.float64)
  with pytest.raises(ValueError, match=r"leaf 0 has dtype float64, the state's has "
                                       r"float32 \(the map must keep the state's "
                                       r"dtype: cast z0"):
    jdeq.fixed_point(_cell, jnp.zeros((2, 3), jnp.float32), _W.astype(jnp.float64), x)


@pytest.mark.parametrize("bad_map, message", [
    (lambda z, w, x: jnp.concatenate([z, z], axis=1), r"shape \(2, 6\)"),
    (lambda z, w, x: (z @ w).astype(jnp.float16), "dtype float16"),
    (lambda z, w, x: (z, x), "pytree structure"),
], ids=["shape", "dtype", "structure"])
def test_map_that_changes_the_state_is_named(bad_map, message):
  with pytest.raises(ValueError, match=message):
    jdeq.fixed_point(bad_map, jnp.zeros((2, 3)), _W, jnp.ones((2, 3)))


@pytest.mark.parametrize("make, name", [
    (lambda: jdeq.FixedPointIteration(max_iter=0), "max_iter"),
    (lambda: jdeq.Anderson(max_iter=0), "max_iter"),
    (lambda: jdeq.Broyden(max_iter=0), "max_iter"),
    (lambda: jdeq.Krylov(max_iter=0), "max_iter"),
    (lambda: jdeq.Unrolled(steps=0), "steps"),
    (lambda: jdeq.Phantom(k=0), "k"),
])
def test_zero_iterations_are_refused(make, name):
  with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got 0"):
    make()


@pytest.mark.parametrize("budget", [0, -1, 11])
def test_python_budget_out_of_range_is_refused(budget):
  with pytest.raises(ValueError, match=r"budget must be in \[1, max_iter=10\]"):
    jdeq.fixed_point(_cell, jnp.zeros((2, 3)), _W, jnp.ones((2, 3)),
                     solver=jdeq.FixedPointIteration(10, 1e-3), budget=budget)


def test_traced_budget_out_of_range_is_clipped():
  """A traced budget cannot be checked without a host sync: it is clipped to
  ``[1, max_iter]`` (documented in ``jdeq.fixed_point``)."""
  solver = jdeq.FixedPointIteration(10, 1e-30)  # never converges: runs the budget
  run = jax.jit(lambda budget: jdeq.fixed_point(
      _cell, jnp.zeros((2, 3)), _W, jnp.ones((2, 3)), solver=solver,
      budget=budget)[1].nstep)
  for budget, nstep in ((-5, 1), (0, 1), (4, 4), (10 ** 6, 10)):
    np.testing.assert_array_equal(run(jnp.int32(budget)), nstep, err_msg=str(budget))


# --- the training step ------------------------------------------------------------

class _NormedTiny(testing.TinyDEQClassifier):
  """The tiny classifier behind a BatchNorm: a model with floating non-parameter
  state (batch statistics), which a NaN batch must not poison either."""

  def __init__(self, *, rngs: nnx.Rngs):
    super().__init__(IMAGE_SHAPE, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(int(np.prod(IMAGE_SHAPE)), rngs=rngs)

  def __call__(self, images, train=True, **kwargs):
    flat = images.reshape(images.shape[0], -1)
    normed = self.norm(flat, use_running_average=not train)
    return super().__call__(normed.reshape(images.shape), train=train, **kwargs)


def _floating_leaves(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)]


def test_nonfinite_batch_skips_the_update_and_is_counted():
  config = train.TrainConfig(total_steps=2, lr=0.1)
  optimizer = train.make_optimizer(config, 1)
  state = train.create_train_state(_NormedTiny(rngs=nnx.Rngs(0)), optimizer, seed=0)
  step = train.make_train_step(optimizer, train.JacobianSchedule.from_config(config, 1),
                               unrolled=True, donate=False)
  images, labels = testing.synthetic_dataset(8, IMAGE_SHAPE)
  poisoned = images.copy()
  poisoned[3, 0, 0, 0] = np.nan
  poisoned[5, 1, 1, 0] = np.inf

  skipped, metrics = step(state, {"image": poisoned, "label": labels})
  assert float(metrics.nonfinite) == 1 and float(metrics.count) == 0
  assert int(skipped.step) == 1  # the step counter (and the RNG streams) advance
  for name in ("params", "opt_state", "model_state"):  # batch statistics included
    before, after = (_floating_leaves(getattr(s, name)) for s in (state, skipped))
    assert before, name
    for old, new in zip(before, after):
      np.testing.assert_array_equal(new, old, err_msg=name)
  # The whole optimizer state, its step count included (the schedule does not move).
  for old, new in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(skipped.opt_state)):
    np.testing.assert_array_equal(new, old)
  summary = metrics_lib.summarize_train(metrics)
  assert summary["nonfinite_steps"] == 1
  assert all(np.isfinite(v) for v in summary.values()), summary

  applied, clean = step(skipped, {"image": images, "label": labels})
  assert float(clean.nonfinite) == 0 and float(clean.count) == 1
  interval = metrics_lib.summarize_train(metrics_lib.accumulate(metrics, clean))
  assert interval["nonfinite_steps"] == 1
  np.testing.assert_allclose(interval["loss"], float(clean.loss))  # mean of 1 step
  assert not all(np.array_equal(a, b) for a, b in zip(
      _floating_leaves(skipped.params), _floating_leaves(applied.params)))


# --- runs, checkpoints and the CLI ------------------------------------------------

def _fit(model, workdir):
  images, labels = testing.synthetic_dataset(32, IMAGE_SHAPE)
  return train.fit(
      model, train.TrainConfig(total_steps=1),
      train_batches=lambda s: testing.in_memory_train_batches(images, labels, 16,
                                                              start_step=s),
      eval_batches=lambda: testing.in_memory_eval_batches(images, labels, 32),
      steps_per_epoch=2, workdir=str(workdir), progress=False)


def test_checkpoint_from_another_model_is_named(tmp_path):
  """fit resuming a workdir written by another model stops before training."""
  tiny = testing.TinyDEQClassifier(IMAGE_SHAPE, 3, rngs=nnx.Rngs(0))
  optimizer = train.make_optimizer(train.TrainConfig(total_steps=1), 1)
  checkpointer = train.Checkpointer(tmp_path / "checkpoints")
  checkpointer.save(train.create_train_state(tiny, optimizer, seed=0), {})
  checkpointer.close()
  with pytest.raises(train.CheckpointError) as error:
    _fit(_NormedTiny(rngs=nnx.Rngs(0)), tmp_path)
  message = str(error.value)
  assert "does not match the model" in message and str(tmp_path) in message
  assert "missing from the checkpoint" in message and "params/norm/scale" in message
  assert not (tmp_path / "metrics.jsonl").exists()  # nothing ran


def _unwritable_workdirs(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  yield "under a file", blocker / "run"
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o500)
  if not os.access(read_only, os.W_OK):  # the superuser writes anywhere
    yield "read-only directory", read_only / "run"


def test_unwritable_workdir_fails_before_training(tmp_path):
  for what, workdir in _unwritable_workdirs(tmp_path):
    with pytest.raises(ValueError, match=rf"workdir {workdir} is not writable"):
      _fit(testing.TinyDEQClassifier(IMAGE_SHAPE, 3, rngs=nnx.Rngs(0)), workdir)


def test_cli_names_an_unwritable_workdir(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "run"
  code = cli.main(["--config", "mnist_convdeq", "--workdir", str(workdir),
                   "--data-dir", str(tmp_path), "--no-progress"])
  assert code == 2
  assert f"error: workdir {workdir} is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "override train.lr='abc': expected float, got str"),
    ("train.total_steps=2.5", "override train.total_steps=2.5: expected None or int"),
    ("train.lr=True", "override train.lr=True: expected float, got bool"),
    ("data.batch_size=big", "override data.batch_size='big': expected int"),
    ("model.solver=anderson", "override model.solver='anderson': expected "),
    ("model.solver.max_iter=ten", "override model.solver.max_iter='ten': expected int"),
])
def test_override_of_the_wrong_type_is_named(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    experiment_lib.apply_overrides(configs.get("mnist_convdeq"), [override])


def test_override_types_that_fit_are_converted():
  experiment = experiment_lib.apply_overrides(
      configs.get("mnist_convdeq"), ["train.lr=1", "train.decay_epochs=[2, 4]"])
  assert experiment.train.lr == 1.0 and isinstance(experiment.train.lr, float)
  assert experiment.train.decay_epochs == (2, 4)


def test_cli_names_an_override_of_the_wrong_type(capsys):
  assert cli.main(["--config", "mnist_convdeq", "train.lr=abc"]) == 2
  error = capsys.readouterr().err
  assert "error: override train.lr='abc': expected float, got str" in error

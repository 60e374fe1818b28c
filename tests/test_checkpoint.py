"""Checkpoints: round trip, clear errors, and exact resume after SIGKILL."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jdeq import train
from jdeq.train import testing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (4, 4, 1)


def _state(width=16, seed=0):
  config = train.TrainConfig(total_steps=10)
  model = testing.TinyDEQClassifier(IMAGE_SHAPE, 3, width=width, rngs=nnx.Rngs(seed))
  return train.create_train_state(model, train.make_optimizer(config, 1), seed=seed)


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_everything_and_keeps_last_k(tmp_path):
  state = _state(seed=3)
  checkpointer = train.Checkpointer(tmp_path / "ckpt", keep_last_k=2)
  for step in (1, 2, 3):
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                          rng=jax.random.key(step))
    checkpointer.save(state, {"note": "x"})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3]
  restored, meta = train.Checkpointer(tmp_path / "ckpt").restore(_state(seed=0))
  assert meta["note"] == "x" and meta["step"] == 3
  _assert_trees_equal(restored, state)  # params, RNG streams, opt state, step, key
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)


def test_mismatched_checkpoint_names_directory_and_arrays(tmp_path):
  checkpointer = train.Checkpointer(tmp_path / "ckpt")
  checkpointer.save(_state(width=16), {})
  checkpointer.wait()
  with pytest.raises(train.CheckpointError) as error:
    train.Checkpointer(tmp_path / "ckpt").restore(_state(width=8))
  message = str(error.value)
  assert str(tmp_path / "ckpt") in message and "does not match the model" in message
  assert "params/cell/kernel" in message and "(16, 16)" in message


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  checkpointer = train.Checkpointer(tmp_path / "ckpt")
  checkpointer.save(_state(), {})
  checkpointer.wait()
  state_dir = tmp_path / "ckpt" / "0" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(train.CheckpointError, match="unreadable") as error:
    train.Checkpointer(tmp_path / "ckpt").restore(_state())
  assert str(tmp_path / "ckpt") in str(error.value)


def test_restore_without_checkpoint(tmp_path):
  with pytest.raises(train.CheckpointError, match="no checkpoint in"):
    train.Checkpointer(tmp_path / "empty").restore(_state())


_RUN_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from flax import nnx
    from jdeq import train
    from jdeq.train import testing

    workdir, delay = sys.argv[1], float(sys.argv[2])
    images, labels = testing.synthetic_dataset(96, (4, 4, 1))
    config = train.TrainConfig(
        total_steps=20, lr=0.05, pretrain_steps=3, log_every=4, checkpoint_every=4,
        keep_last_k=2, jac_gamma=0.5, jac_prob=0.5, forward_budget=10,
        jac_budget_jitter=2)

    def batches(start):
      iterator = testing.in_memory_train_batches(images, labels, 16, start_step=start)
      for index, batch in enumerate(iterator, start):
        if index >= 8:  # stall after checkpoint 8 (mid-epoch 2) so the kill lands
          time.sleep(delay)
        yield batch

    def model():
      return testing.TinyDEQClassifier((4, 4, 1), 3, dropout=0.3, rngs=nnx.Rngs(0))

    report = train.fit(
        model(), config, train_batches=batches,
        eval_batches=lambda: testing.in_memory_eval_batches(images, labels, 48),
        steps_per_epoch=6, workdir=workdir, progress=False)
    template = train.create_train_state(model(), train.make_optimizer(config, 6),
                                        seed=config.seed)
    state, _ = train.Checkpointer(workdir + "/checkpoints").restore(template)
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state.params)]
    np.savez(workdir + "/params.npz", *leaves)
    print("RESUMED_FROM", report["resumed_from"])
""")


def _launch(script, workdir, delay, cache):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT),
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, str(script), str(workdir), str(delay)],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_RUN_SCRIPT)
  cache = tmp_path / "jax_cache"  # the later processes skip compilation

  reference = _launch(script, tmp_path / "reference", 0.0, cache)
  output, _ = reference.communicate(timeout=240)
  assert reference.returncode == 0, output

  victim_dir = tmp_path / "victim"
  victim = _launch(script, victim_dir, 2.0, cache)
  checkpoints = victim_dir / "checkpoints"
  deadline = time.monotonic() + 180
  while not (checkpoints.exists() and any(
      p.name.isdigit() and int(p.name) >= 8 for p in checkpoints.iterdir())):
    assert victim.poll() is None, victim.communicate()[0]
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.communicate(timeout=60)
  assert victim.returncode == -signal.SIGKILL
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert steps and steps[-1] == 8  # killed mid-epoch (6 steps per epoch)

  resumed = _launch(script, victim_dir, 0.0, cache)
  output, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, output
  resumed_from = int(output.split("RESUMED_FROM")[-1].split()[0])
  assert resumed_from == 8

  expected = np.load(tmp_path / "reference" / "params.npz")
  actual = np.load(victim_dir / "params.npz")
  assert len(expected.files) == len(actual.files) > 0
  for name in expected.files:
    np.testing.assert_array_equal(actual[name], expected[name])

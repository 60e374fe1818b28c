"""Data parallelism: a step on a 4-device mesh equals the single-device step."""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from flax import nnx
    from jdeq import train
    from jdeq.train import testing

    assert jax.device_count() == 4, jax.devices()
    images, labels = testing.synthetic_dataset(16, (4, 4, 1))
    config = train.TrainConfig(total_steps=4, lr=0.05, jac_gamma=0.5, jac_prob=1.0,
                               forward_budget=10, jac_budget_jitter=2)
    optimizer = train.make_optimizer(config, 4)
    jacobian = train.JacobianSchedule.from_config(config, 4)

    def run(devices):
      mesh = train.data_mesh(devices)
      model = testing.TinyDEQClassifier((4, 4, 1), 3, dropout=0.2, rngs=nnx.Rngs(0))
      state = train.replicate(train.create_train_state(model, optimizer, seed=0), mesh)
      step = train.make_train_step(optimizer, jacobian, unrolled=False,
                                   forward_budget=config.forward_budget, mesh=mesh)
      losses = []
      for batch in [{"image": images, "label": labels}] * 2:
        sharded = train.shard_batch(batch, mesh)
        state, metrics = step(state, sharded)
        losses.append(float(metrics.loss))
      shardings = {leaf.sharding.spec for leaf in jax.tree.leaves(state.params)}
      return losses, [np.asarray(x) for x in jax.tree.leaves(state.params)], shardings, sharded

    losses_4, params_4, shardings_4, batch_4 = run(jax.devices())
    losses_1, params_1, _, _ = run(jax.devices()[:1])
    assert len(batch_4["image"].sharding.device_set) == 4
    assert batch_4["image"].addressable_shards[0].data.shape[0] == 4
    assert shardings_4 == {jax.sharding.PartitionSpec()}, shardings_4
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5, atol=1e-6)
    for a, b in zip(params_4, params_1):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    try:
      train.shard_batch({"image": np.zeros((6, 2))}, train.data_mesh())
      raise AssertionError("a batch of 6 on 4 devices was accepted")
    except ValueError as error:
      assert "not divisible" in str(error)
    print("SHARDED_OK", losses_4, losses_1)
""")


def test_sharded_step_equals_single_device_step(tmp_path):
  script = tmp_path / "sharded.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "SHARDED_OK" in result.stdout


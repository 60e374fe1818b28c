"""The reference-parity harness: weight transplant and the jdeq half of the comparison.

The PyTorch half runs locuslab/deq's code and needs torch and a checkout of it; its
test runs only when ``JDEQ_REFERENCE_DIR`` names a checkout and torch imports.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdeq
from experiments.reference_parity import equal_budget, transplant
from experiments.reference_parity import main as parity
from jdeq import models

# A small MDEQ of the same architecture (two branches, weight norm, both heads'
# parts), so the jdeq half runs in seconds.
SMALL = models.MDEQConfig(
    channels=(8, 8), expansion=2, num_groups=4, head_channels=(2, 4), final_channels=16,
    post_gn_affine=False, unrolled_steps=2,
    solver=jdeq.Broyden(max_iter=5, tol=1e-3, stop_mode="rel", memory=5),
    eval_solver=jdeq.Broyden(max_iter=5, tol=1e-3, stop_mode="rel", memory=5),
    grad=jdeq.IFT(jdeq.Broyden(max_iter=6, tol=1e-3, stop_mode="rel", memory=6)))
RUNNING = ("running_mean", "running_var")


def _arrays(model):
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  return {path: np.asarray(value) for path, value in
          nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)).items()}


@pytest.mark.parametrize("name", ["mdeq_cifar_tiny", "mdeq_cifar_large"])
def test_transplant_round_trip_and_reference_parameter_count(name):
  source = models.create(name, rngs=nnx.Rngs(0))
  target = models.create(name, rngs=nnx.Rngs(1))
  tensors = transplant.export(source)
  before = _arrays(target)
  transplant.load(target, tensors)
  after, expected = _arrays(target), _arrays(source)
  assert any(not np.array_equal(before[p], expected[p]) for p in expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  # The reference counts its trainable tensors (its state dict less the BatchNorm
  # statistics): the translated names must cover exactly that many entries.
  trainable = sum(v.size for k, v in tensors.items() if not k.endswith(RUNNING))
  assert trainable == models.reference(name).params


def test_reference_names_and_layouts_follow_the_reference_state_dict():
  tensors = transplant.export(models.create("mdeq_cifar_tiny", rngs=nnx.Rngs(0)))
  # Names and shapes as MDEQClsNet(TINY).state_dict() has them (locuslab/deq@1fb7059).
  expected = {
      "downsample.0.weight": (24, 3, 3, 3), "downsample.4.running_var": (24,),
      "fullstage.branches.0.blocks.0.conv1.weight_g": (120, 1, 1, 1),
      "fullstage.branches.1.blocks.0.conv2.weight_v": (24, 120, 3, 3),
      "fullstage.branches.0.blocks.0.gn3.bias": (24,),
      "fullstage.fuse_layers.0.1.net.conv.weight": (24, 24, 1, 1),
      "fullstage.fuse_layers.1.0.net.0.gnorm.weight": (24,),
      "fullstage.post_fuse_layers.1.conv.weight_v": (24, 24, 1, 1),
      "incre_modules.1.0.downsample.1.bias": (64,),
      "incre_modules.0.0.bn3.running_mean": (32,),
      "downsamp_modules.0.0.weight": (64, 32, 3, 3), "final_layer.1.weight": (200,),
      "classifier.weight": (10, 200), "classifier.bias": (10,)}
  for name, shape in expected.items():
    assert tensors[name].shape == shape, name
  assert len(tensors) == 82  # the state dict's entries less num_batches_tracked


def test_transplant_rejects_missing_misshapen_and_leftover_tensors():
  model = models.create(SMALL, rngs=nnx.Rngs(0))
  tensors = transplant.export(model)
  missing = dict(tensors)
  del missing["classifier.bias"]
  with pytest.raises(transplant.TransplantError, match="classifier.bias"):
    transplant.load(model, missing)
  misshapen = dict(tensors, **{"classifier.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(transplant.TransplantError, match="shape"):
    transplant.load(model, misshapen)
  leftover = dict(tensors, **{"stage0.0.weight": np.zeros((1,), np.float32)})
  with pytest.raises(transplant.TransplantError, match="stage0.0.weight"):
    transplant.load(model, leftover)


def _fake_reference(seed: int = 3):
  """A 'reference' whose initial weights are a jdeq model's own."""
  tensors = transplant.export(models.create(parity.model_config(1e-3, SMALL),
                                            rngs=nnx.Rngs(seed)))
  names = sorted(k for k in tensors if not k.endswith(RUNNING))
  return dict(names=np.array(names), **{f"init/{k}": v for k, v in tensors.items()})


def _batches(steps: int = 3, batch: int = 2):
  images = jax.random.normal(jax.random.key(0), (steps, batch, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(1), (steps, batch), 0, 10)
  return dict(images=np.asarray(images), labels=np.asarray(labels, np.int32))


def test_jdeq_half_against_a_fake_reference(tmp_path):
  fake, batches = _fake_reference(), _batches()
  ours = parity.run_jdeq(fake, batches, unrolled_steps=2, tol=1e-3, base=SMALL)
  names = [str(n) for n in fake["names"]]
  init = np.concatenate([fake[f"init/{n}"].ravel() for n in names])
  # Adam's first update is lr·g/(|g| + ε) (both bias corrections cancel).
  g = ours["grads"][0]
  np.testing.assert_allclose(ours["params"][0], init - 1e-3 * g / (np.abs(g) + 1e-8),
                             atol=2e-7)
  # The diagnostic pass and the train step see the same loss.
  np.testing.assert_allclose(ours["loss"], ours["step_loss"], rtol=1e-5)
  assert np.isnan(ours["fwd_residual"][0]) and np.isfinite(ours["fwd_residual"][2])
  assert 1 <= ours["fwd_nfe"][2] <= SMALL.solver.max_iter

  # A reference that behaves exactly like jdeq: every difference is zero.
  reference = dict(fake, **{key: np.stack(value) for key, value in ours.items()})
  rows = parity.compare(reference, ours, unrolled_steps=2)
  assert [row["mode"] for row in rows] == ["unrolled", "unrolled", "equilibrium"]
  for row in rows:
    assert row["loss_rel_diff"] == row["logits_rel_diff"] == row["params_rel_diff"] == 0
  found = parity.summary(rows)
  assert found["unrolled"]["first_step_beyond"] is None
  assert found["equilibrium"]["first_step_beyond"] is None

  # One equilibrium loss off by 2e-3 is flagged at its step, and only there.
  reference["loss"] = reference["loss"].copy()
  reference["loss"][2] *= 1 + 2e-3
  found = parity.summary(parity.compare(reference, ours, unrolled_steps=2))
  assert found["equilibrium"]["first_step_beyond"] == 2
  assert found["unrolled"]["first_step_beyond"] is None
  parity.plot(rows, str(tmp_path / "parity.png"))
  assert (tmp_path / "parity.png").stat().st_size > 0
  assert "equilibrium" in parity.report(rows)


def test_reference_self_check_sets_and_reports_the_reference_spread(tmp_path):
  args = parity.parser().parse_args([])
  assert args.self_check == "threads"
  assert parity.rerun_settings(args, "threads").threads == 1
  one = parity.parser().parse_args(["--threads", "1"])
  changed = parity.rerun_settings(one, "threads")
  assert changed.threads == 2 and vars(changed) == dict(vars(one), threads=2)
  assert parity.rerun_settings(args, "float64").float64
  with pytest.raises(ValueError, match="float64 already"):
    parity.rerun_settings(parity.parser().parse_args(["--float64"]), "float64")
  # The harness refuses that combination before it runs either side.
  never = lambda *unused: pytest.fail("the reference ran")
  assert parity.main(["--out", str(tmp_path), "--float64", "--self-check", "float64"],
                     reference_runner=never) == 2

  # jdeq parts from the reference at step 2; the reference parts from itself at step 1.
  rng = np.random.default_rng(0)
  steps = 4
  reference = dict(loss=np.full(steps, 2.0), logits=rng.normal(size=(steps, 2, 10)),
                   grads=rng.normal(size=(steps, 7)), params=rng.normal(size=(steps, 7)),
                   **{f"grad_{p}": np.ones(steps) for p in parity.PARTS},
                   **{k: np.ones(steps) for k in ("fwd_residual", "fwd_nfe",
                                                   "bwd_residual", "bwd_nfe")})
  ours = dict(reference, loss=reference["loss"] * (1 + np.array([0, 0, 2e-3, 2e-3])))
  rerun = dict(reference, loss=reference["loss"] * (1 + np.array([0, 5e-4, 5e-4, 0])))
  rows = parity.with_spread(parity.compare(reference, ours, unrolled_steps=2),
                            parity.compare(reference, rerun, unrolled_steps=2))
  assert [r["loss_rel_diff_self"] for r in rows] == pytest.approx([0, 5e-4, 5e-4, 0])
  found = parity.summary(rows)
  assert found["unrolled"]["first_step_beyond"] is None
  assert found["unrolled"]["reference_self"]["first_step_beyond"] == 1
  assert found["equilibrium"]["first_step_beyond"] == 2
  assert found["equilibrium"]["reference_self"]["first_step_beyond"] is None
  assert found["unrolled"]["reference_self"]["max_loss_rel_diff"] == pytest.approx(5e-4)
  assert "d_loss_self" in parity.report(rows)
  parity.plot(rows, str(tmp_path / "spread.png"))
  with pytest.raises(ValueError, match="4 steps of jdeq against 3"):
    parity.with_spread(rows, rows[:3])


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_stop_scope_reaches_every_solver(scope):
  """The harness's jdeq solvers decide as the reference's (batch) unless told not to."""
  config = parity.model_config(1e-3, SMALL, scope)
  assert {config.solver.stop_scope, config.eval_solver.stop_scope,
          config.grad.solver.stop_scope} == {scope}
  assert parity.parser().parse_args([]).stop_scope == "batch"


def test_without_a_reference_the_harness_says_what_it_needs(capsys):
  assert parity.main(["--out", "unused"]) == 2
  assert "--reference-dir" in capsys.readouterr().err
  assert equal_budget.main(["--out", "unused", "--sides", "reference"]) == 2
  assert "--torch-python" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("JDEQ_REFERENCE_DIR")
                    or not os.environ.get("JDEQ_TORCH_PYTHON"),
                    reason="needs JDEQ_REFERENCE_DIR (a locuslab/deq checkout) and "
                           "JDEQ_TORCH_PYTHON (a Python with torch)")
def test_reference_half_runs_the_authors_code(tmp_path):
  batches = _batches(steps=2, batch=2)
  np.savez(tmp_path / "b.npz", **batches)
  subprocess.run([os.environ["JDEQ_TORCH_PYTHON"], parity.TORCH_SIDE, "parity",
                  "--reference-dir", os.environ["JDEQ_REFERENCE_DIR"],
                  "--batches", str(tmp_path / "b.npz"), "--out", str(tmp_path / "r.npz"),
                  "--pretrain-steps", "1", "--total-steps", "100"], check=True)
  reference = dict(np.load(tmp_path / "r.npz"))
  ours = parity.run_jdeq(reference, batches, unrolled_steps=1, tol=1e-3)
  rows = parity.compare(reference, ours, unrolled_steps=1)
  assert rows[0]["loss_rel_diff"] < 1e-5 and rows[0]["logits_rel_diff"] < 1e-4

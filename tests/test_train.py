"""Tests of jdeq.train: configuration, schedules, the JR schedule, steps, the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdeq import train
from jdeq.train import metrics as metrics_lib
from jdeq.train import testing
from tests import helpers

IMAGE_SHAPE = (4, 4, 1)


# --- configuration ------------------------------------------------------------------

def test_train_config_rejects_unknown_and_invalid_options():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['lrr'\]"):
    train.TrainConfig(total_steps=10, lrr=0.1)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    train.TrainConfig(total_steps=10, optimizer="rmsprop")
  with pytest.raises(ValueError, match="exactly one of epochs and total_steps"):
    train.TrainConfig()
  with pytest.raises(ValueError, match="exactly one of epochs and total_steps"):
    train.TrainConfig(epochs=1, total_steps=10)
  with pytest.raises(ValueError, match="jac_budget_jitter needs forward_budget"):
    train.TrainConfig(total_steps=10, jac_budget_jitter=2)
  with pytest.raises(ValueError, match="jac_prob"):
    train.TrainConfig(total_steps=10, jac_prob=1.5)


def test_num_steps_from_epochs():
  assert train.TrainConfig(epochs=2.5).num_steps(100) == 250
  assert train.TrainConfig(total_steps=7).num_steps(100) == 7


# --- schedules and optimizers ---------------------------------------------------------

def test_cosine_schedule_is_per_iteration():
  schedule = train.make_schedule(
      train.TrainConfig(total_steps=100, lr=1.0, schedule="cosine"), 10)
  expected = 0.5 * (1 + np.cos(np.pi * np.arange(100) / 100))
  np.testing.assert_allclose([schedule(t) for t in range(100)], expected, atol=1e-6)


def test_step_schedule_decays_at_epochs_and_warmup_ramps():
  config = train.TrainConfig(epochs=5, lr=0.1, schedule="step", decay_epochs=(2, 4))
  schedule = train.make_schedule(config, steps_per_epoch=10)
  np.testing.assert_allclose(
      [schedule(t) for t in (0, 19, 20, 39, 40, 49)],
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)
  warm = train.make_schedule(
      train.TrainConfig(total_steps=20, lr=1.0, schedule="constant",
                        warmup_steps=4), 10)
  np.testing.assert_allclose([warm(t) for t in (0, 2, 4, 10)], [0, 0.5, 1, 1])


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
def test_optimizers_descend(name):
  config = train.TrainConfig(total_steps=50, optimizer=name, lr=0.1,
                             schedule="constant", grad_clip_norm=10.0)
  optimizer = train.make_optimizer(config, 10)
  params = {"w": jnp.array([3.0, -2.0])}
  state = optimizer.init(params)
  for _ in range(50):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 1.0


def test_weight_decay_coupled_and_decoupled():
  params = {"w": jnp.array([2.0])}
  zero = {"w": jnp.zeros(1)}
  for name, expected in (("sgd", 2.0 - 0.1 * 0.5 * 2.0),
                         ("adamw", 2.0 - 0.1 * 0.5 * 2.0)):
    config = train.TrainConfig(total_steps=5, optimizer=name, lr=0.1,
                               momentum=0.0, weight_decay=0.5,
                               schedule="constant")
    optimizer = train.make_optimizer(config, 1)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                               [expected], rtol=1e-6)


# --- Jacobian-regularization schedule ------------------------------------------------

def test_jacobian_gamma_increments_and_stops_at_epoch():
  config = train.TrainConfig(total_steps=1000, jac_gamma=0.5, jac_gamma_increment=0.1,
                             jac_increment_every=100, jac_stop_epoch=3)
  schedule = train.JacobianSchedule.from_config(config, steps_per_epoch=100)
  assert schedule.stop_step == 300 and schedule.enabled
  gammas = [float(schedule.gamma_at(t)) for t in (0, 99, 100, 250, 299, 300, 900)]
  np.testing.assert_allclose(gammas, [0.5, 0.5, 0.6, 0.7, 0.7, 0.0, 0.0], atol=1e-6)


def test_jacobian_schedule_disabled_cases():
  spe = 10
  for options in ({"jac_gamma": 0.0}, {"jac_gamma": 1.0, "jac_prob": 0.0},
                  {"jac_gamma": 1.0, "jac_stop_epoch": 0}):
    schedule = train.JacobianSchedule.from_config(
        train.TrainConfig(total_steps=10, **options), spe)
    assert not schedule.enabled, options
  only_increments = train.JacobianSchedule.from_config(
      train.TrainConfig(total_steps=10, jac_gamma_increment=0.1,
                        jac_increment_every=5), spe)
  assert only_increments.enabled


def test_jacobian_draw_frequency_is_p_and_budget_jitter_is_bounded():
  schedule = train.JacobianSchedule(gamma=1.0, prob=0.3, budget_jitter=2)
  keys = jax.random.split(jax.random.key(0), 4000)
  regularize, gamma, jitter = jax.vmap(lambda k: schedule.draw(k, 5))(keys)
  budget = train.JacobianSchedule.budget(8, jitter)
  assert train.JacobianSchedule.budget(None, jitter) is None
  assert abs(float(jnp.mean(regularize)) - 0.3) < 0.03
  np.testing.assert_allclose(gamma, 1.0)
  jittered = np.asarray(budget)[np.asarray(regularize)]
  assert set(np.unique(jittered)) == {6, 7, 8, 9, 10}
  np.testing.assert_array_equal(np.asarray(budget)[~np.asarray(regularize)], 8)
  # γ = 0 (after the stop epoch) never regularizes, whatever the draw.
  stopped = train.JacobianSchedule(gamma=1.0, prob=1.0, stop_step=3)
  assert not bool(stopped.draw(jax.random.key(1), 3)[0])


# --- losses ---------------------------------------------------------------------------

def test_classification_sums_mask_padding_and_ignore_label():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
  labels = jnp.array([0, 0, 1])
  loss, correct, weight = metrics_lib.classification_sums(
      logits, labels, jnp.array([1.0, 1.0, 0.0]))
  assert float(weight) == 2 and float(correct) == 1
  expected = (optax.softmax_cross_entropy_with_integer_labels(logits[:2], labels[:2]))
  np.testing.assert_allclose(loss, jnp.sum(expected), rtol=1e-6)
  # Segmentation: the ignore label 255 carries no weight.
  seg_logits = jnp.zeros((1, 2, 2, 3))
  seg_labels = jnp.array([[[0, 255], [2, 1]]])
  _, _, seg_weight = metrics_lib.classification_sums(seg_logits, seg_labels)
  assert float(seg_weight) == 3
  with pytest.raises(ValueError, match="do not match logits"):
    metrics_lib.classification_sums(logits, jnp.zeros((3, 2), jnp.int32))


# --- steps and the loop ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset():
  return testing.synthetic_dataset(120, IMAGE_SHAPE)


def _model(seed=0, **kwargs):
  return testing.TinyDEQClassifier(IMAGE_SHAPE, 3, rngs=nnx.Rngs(seed), **kwargs)


def test_eval_step_ignores_padding(dataset):
  images, labels = dataset
  images, labels = images[:100], labels[:100]
  config = train.TrainConfig(total_steps=1)
  state = train.create_train_state(_model(), train.make_optimizer(config, 1), seed=0)
  mesh = train.data_mesh()
  eval_step = train.make_eval_step(mesh=mesh)
  padded = train.evaluate(state, eval_step,
                          testing.in_memory_eval_batches(images, labels, 40), mesh)
  exact = train.evaluate(state, eval_step,
                         testing.in_memory_eval_batches(images, labels, 50), mesh)
  assert padded["samples"] == exact["samples"] == 100
  for key in ("accuracy", "loss", "fwd_nfe", "residual"):
    np.testing.assert_allclose(padded[key], exact[key], rtol=1e-5, err_msg=key)


def test_nonfinite_gradient_skips_the_update(dataset):
  images, labels = dataset
  config = train.TrainConfig(total_steps=1, lr=0.1)
  optimizer = train.make_optimizer(config, 1)
  state = train.create_train_state(_model(), optimizer, seed=0)
  step = train.make_train_step(
      optimizer, train.JacobianSchedule.from_config(config, 1), unrolled=True,
      donate=False)
  bad = {"image": np.full((8,) + IMAGE_SHAPE, np.nan, np.float32),
         "label": labels[:8]}
  new_state, metrics = step(state, bad)
  assert float(metrics.nonfinite) == 1
  assert int(new_state.step) == 1
  for old, new in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
    np.testing.assert_array_equal(old, new)


def test_split_regularized_steps_replay_the_in_graph_draws(dataset):
  """fit's pair of compiled steps, chosen by the pre-drawn decisions, computes what
  the single lax.cond step computes."""
  images, labels = dataset
  config = train.TrainConfig(total_steps=6, lr=0.05, jac_gamma=0.5, jac_prob=0.5,
                             forward_budget=10, jac_budget_jitter=2)
  optimizer = train.make_optimizer(config, 6)
  jacobian = train.JacobianSchedule.from_config(config, 6)
  make = lambda regularized: train.make_train_step(
      optimizer, jacobian, unrolled=False, regularized=regularized,
      forward_budget=config.forward_budget, donate=False)
  in_graph, split = make(None), {True: make(True), False: make(False)}
  state = train.create_train_state(_model(), optimizer, seed=3)
  decisions = jacobian.regularized_steps(state.rng, 6)
  assert 0 < decisions.sum() < 6, decisions  # both kinds of step are exercised
  cond_state = split_state = state
  for step in range(6):
    batch = {"image": images[16 * step:16 * step + 16],
             "label": labels[16 * step:16 * step + 16]}
    cond_state, cond_metrics = in_graph(cond_state, batch)
    split_state, split_metrics = split[bool(decisions[step])](split_state, batch)
    assert float(cond_metrics.regularized) == float(decisions[step])
    np.testing.assert_allclose(split_metrics.loss, cond_metrics.loss, rtol=1e-5)
    np.testing.assert_allclose(split_metrics.jac_loss, cond_metrics.jac_loss,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split_metrics.fwd_nfe, cond_metrics.fwd_nfe)
  for a, b in zip(jax.tree.leaves(cond_state.params),
                  jax.tree.leaves(split_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_trains_logs_reports_and_plots(dataset, tmp_path):
  images, labels = dataset
  config = train.TrainConfig(total_steps=24, lr=0.05, pretrain_steps=4,
                             log_every=4, eval_every=12, checkpoint_every=8,
                             keep_last_k=2, jac_gamma=0.5, jac_prob=0.5,
                             forward_budget=10, jac_budget_jitter=2)
  report = train.fit(
      _model(), config,
      train_batches=lambda s: testing.in_memory_train_batches(images, labels, 16,
                                                              start_step=s),
      eval_batches=lambda: testing.in_memory_eval_batches(images, labels, 32),
      steps_per_epoch=7, workdir=str(tmp_path), progress=False,
      meta={"experiment": "tiny"})
  assert report["stopped"] == "completed" and report["step"] == 24
  assert report["test_accuracy"] > 0.6  # chance is 1/3
  assert report["final_test"]["samples"] == 120
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["config"]["experiment"] == "tiny"
  assert saved["config"]["train"]["jac_gamma"] == 0.5
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_records] == [4, 8, 12, 16, 20, 24]
  assert train_records[0]["mode"] == "unrolled"
  assert train_records[-1]["mode"] == "equilibrium"
  assert any(r["regularized_fraction"] > 0 and r["jac_loss"] > 0
             for r in train_records[1:])
  assert all(np.isfinite(r["loss"]) and r["fwd_nfe"] > 0 for r in train_records)
  assert [r["step"] for r in records if r["kind"] == "eval"] == [12, 24]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "24"]
  for name in ("curves.png", "solver.png"):
    assert (tmp_path / name).stat().st_size > 1000
  # The same scalars as TensorBoard events beside metrics.jsonl.
  scalars = helpers.read_event_scalars(tmp_path)
  assert [step for step, _ in scalars["train/loss"]] == [4, 8, 12, 16, 20, 24]
  np.testing.assert_allclose([value for _, value in scalars["train/loss"]],
                             [r["loss"] for r in train_records], rtol=1e-6)
  assert [step for step, _ in scalars["eval/accuracy"]] == [12, 24]
  assert {"train/fwd_nfe", "train/residual", "train/lr", "eval/loss",
          "eval/fwd_nfe", "eval/residual"} <= set(scalars)
  assert "train/mode" not in scalars  # strings stay in the JSON lines


def test_time_budget_stops_cleanly_and_reports(dataset, tmp_path):
  images, labels = dataset
  config = train.TrainConfig(total_steps=1000, log_every=100, max_minutes=1e-6,
                             checkpoint_every=None)
  report = train.fit(
      _model(), config,
      train_batches=lambda s: testing.in_memory_train_batches(images, labels, 16,
                                                              start_step=s),
      eval_batches=lambda: testing.in_memory_eval_batches(images, labels, 60),
      steps_per_epoch=7, workdir=str(tmp_path), progress=False)
  assert report["step"] == 1 and "time budget" in report["stopped"]
  assert 0 <= report["test_accuracy"] <= 1
  assert os.listdir(tmp_path / "checkpoints") == ["1"]

"""Language models through the training loop: fit, exact resume with the memory
carry, evaluation with memory, budget sweeps, and the CPU-scale study's arms."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import jdeq
from experiments import configs
from experiments.jacreg_lm import config as study
from experiments.jacreg_lm import main as study_main
from jdeq import data, train
from jdeq.experiment import apply_overrides, model_config
from jdeq.train import testing

VOCAB = 12
STREAM = testing.token_stream(3000, VOCAB, seed=0)
TRAIN_IDS, VALID_IDS = STREAM[:2400], STREAM[2400:]


def _model(**kwargs):
  return testing.TinyDEQLanguageModel(VOCAB, width=16, mem_len=6, rngs=nnx.Rngs(0),
                                      **kwargs)


def _config(total_steps, **overrides):
  settings = dict(total_steps=total_steps, optimizer="adam", lr=0.03,
                  schedule="constant", log_every=2, checkpoint_every=2, keep_last_k=2,
                  jac_gamma=0.5, jac_prob=0.5, forward_budget=8, jac_budget_jitter=2,
                  pretrain_steps=2)
  settings.update(overrides)
  return train.TrainConfig(**settings)


def _fit(workdir, total_steps, train_batches=None, **overrides):
  train_batches = train_batches or (
      lambda start: data.stream_train_batches(TRAIN_IDS, 6, 10, start_step=start))
  return train.fit(
      _model(), _config(total_steps, **overrides), train_batches=train_batches,
      eval_batches=lambda: data.stream_eval_batches(VALID_IDS, 4, 10),
      steps_per_epoch=len(TRAIN_IDS) // 6 // 10, workdir=str(workdir), progress=False,
      task=train.LanguageModeling(), meta={"eval_split": "validation"})


def _final_state(workdir, total_steps):
  model = _model()
  first = next(data.stream_train_batches(TRAIN_IDS, 6, 10))
  return train.restore_state(
      model, str(workdir / "checkpoints"),
      train.make_optimizer(_config(total_steps), len(TRAIN_IDS) // 60),
      carry=train.LanguageModeling().init_carry(model, first))


def test_fit_learns_and_reports_perplexity_and_tokens(tmp_path, capsys):
  report = _fit(tmp_path, 40, lr=0.05, jac_prob=0.3)
  assert report["test_accuracy"] is None
  # a uniform model has perplexity VOCAB; the Markov chain is far more predictable
  assert report["test_perplexity"] < 0.8 * VOCAB
  assert report["train_tokens_per_s"] > 0
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  trains = [r for r in records if r["kind"] == "train"]
  assert all("perplexity" in r and "accuracy" not in r for r in trains)
  assert trains[-1]["perplexity"] < trains[0]["perplexity"]
  assert (tmp_path / "curves.png").exists() and (tmp_path / "solver.png").exists()
  output = capsys.readouterr().out
  # without a progress bar every log interval is a printed line
  assert "step 2/40: loss" in output and "ppl" in output and "tok_s" in output
  assert "final validation perplexity" in output


def test_resume_continues_exactly_with_the_memory_carry(tmp_path):
  _fit(tmp_path / "whole", 8)
  _fit(tmp_path / "split", 4)
  resumed = _fit(tmp_path / "split", 8)
  assert resumed["resumed_from"] == 4
  whole, split = _final_state(tmp_path / "whole", 8), _final_state(tmp_path / "split", 8)
  for a, b in zip(jax.tree.leaves((whole.params, whole.carry)),
                  jax.tree.leaves((split.params, split.carry))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the carry is live: the memory is full, and a run whose memory is cleared
  # before every batch ends elsewhere (so a lost carry would fail the test above)
  assert float(np.min(np.asarray(whole.carry.valid))) == 1.0

  def amnesic(start):
    for batch in data.stream_train_batches(TRAIN_IDS, 6, 10, start_step=start):
      yield dict(batch, reset=np.ones_like(batch["reset"]))

  _fit(tmp_path / "amnesic", 8, train_batches=amnesic)
  cleared = _final_state(tmp_path / "amnesic", 8)
  difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(whole.params),
                                   jax.tree.leaves(cleared.params)))
  assert difference > 1e-4


def test_budget_sweep_of_a_language_model_matches_the_evaluation_pass(tmp_path):
  _fit(tmp_path, 6)
  traced = jdeq.Anderson(max_iter=12, tol=1e-9, record_trace=True)
  model = _model(solver=traced)
  first = next(data.stream_train_batches(TRAIN_IDS, 6, 10))
  task = train.LanguageModeling()
  state = train.restore_state(model, str(tmp_path / "checkpoints"),
                              train.make_optimizer(_config(6), 40),
                              carry=task.init_carry(model, first))
  batches = list(data.stream_eval_batches(VALID_IDS, 4, 10))
  sweep = train.budget_sweep(state, batches, budgets=[1, 3, 12], tolerances=(1e-3,),
                             task=task)
  assert sorted(sweep["perplexity"]) == [1, 3, 12] and "accuracy" not in sweep
  assert len(sweep["mean_trace"]) == 12 and sweep["samples"] == 4 * len(batches)
  # the full-budget pass is the loop's evaluation (memory carried the same way)
  summary = train.evaluate(state, train.make_eval_step(task=task), batches,
                           train.data_mesh(), task=task)
  assert sweep["perplexity"][12] == pytest.approx(summary["perplexity"], rel=1e-5)
  # a one-evaluation stop is far from the equilibrium and predicts differently
  assert sweep["perplexity"][1] != pytest.approx(sweep["perplexity"][12], rel=1e-3)


@pytest.mark.parametrize("name", sorted(study.ARMS))
def test_study_arms_are_the_base_experiment_with_their_budgets(name):
  arm = study.ARMS[name]
  experiment, overrides = study_main.arm_experiment(name, minutes=2.0, seed=3,
                                                    manual_dir="some/dir")
  model = model_config(experiment)
  assert model.pre_ln == arm.pre_ln
  assert model.solver.max_iter == model.eval_solver.max_iter == arm.forward
  assert model.grad.solver.max_iter == arm.backward + 1
  assert experiment.train.total_steps == round(2.0 * arm.steps_per_minute)
  assert experiment.train.max_minutes == 2.0 and experiment.train.seed == 3
  assert experiment.train.jac_gamma == arm.gamma
  assert experiment.data.manual_dir == "some/dir"
  if arm.gamma:
    assert experiment.train.forward_budget == arm.forward
    assert experiment.train.jac_increment_every > 0
  # the same overrides build the same experiment through the command line's path
  assert apply_overrides(configs.get(study.BASE_EXPERIMENT), overrides) == experiment


def test_study_rejects_an_unknown_arm(capsys):
  with pytest.raises(SystemExit):
    study_main.main(["--arms", "postln,prelnn"])
  assert "unknown arms ['prelnn']" in capsys.readouterr().err


@pytest.mark.parametrize("name, mem_len, threshold, gamma", [
    ("deq_transformer_wt103_postln", 150, 30, 0.0),
    ("deq_transformer_wt103_postln_jr", 300, 12, 1.9),
    ("deq_transformer_wt103_preln_jr", 300, 14, 2.0)])
def test_wt103_experiments_follow_the_reference_scripts(name, mem_len, threshold, gamma):
  experiment = configs.get(name)
  model = model_config(experiment)
  assert (model.mem_len, model.solver.max_iter, model.vocab_size) == (
      mem_len, threshold, 267_735)
  assert experiment.data.name == "wikitext103" and experiment.data.batch_size == 56
  assert experiment.data.tgt_len == 150
  settings = experiment.train
  assert (settings.lr, settings.warmup_steps, settings.total_steps) == (2.5e-4, 16_000,
                                                                        300_000)
  assert (settings.grad_clip_norm, settings.pretrain_steps) == (0.25, 32_000)
  assert settings.jac_gamma == gamma
  if gamma:
    assert settings.forward_budget == threshold and settings.jac_gamma_increment == 0.1

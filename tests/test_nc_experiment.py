"""The neural-collapse experiment: its grid, its CLI, its configs and a smoke run."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.neural_collapse import config as nc_config
from experiments.neural_collapse import main as nc_main
import jdeq
from jdeq import models


def test_help_lists_the_grid(capsys):
  with pytest.raises(SystemExit) as exit_info:
    nc_main.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert len(nc_config.GRID) == 20  # balanced + 9 imbalanced, CIFAR-10 and -100
  for name in nc_config.GRID:
    assert name in text


def test_bad_grid_entry_is_a_clear_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    nc_main.main(["--setting", "cifar10_ka4_r10"])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert "unknown setting 'cifar10_ka4_r10'" in error and "cifar10_ka3_r10" in error


def test_grid_follows_the_protocol():
  setting = nc_config.get_setting("cifar10_ka3_r10")
  assert setting.minority_classes == tuple(range(3, 10))
  imbalance = nc_main.imbalance_of(setting, 5000)
  assert imbalance.n_minority == 500 and imbalance.seed is not None
  assert imbalance.class_seed is None  # labels 0…K_A−1 are the majority
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))
  from jdeq.data import imbalance as imbalance_lib
  kept = imbalance_lib.subset_indices(nc_main.imbalance_of(setting, 500), labels, 10)
  # Each minority class keeps the first n_B of the shuffle that draws a majority class's n_A.
  balanced = imbalance_lib.subset_indices(
      nc_main.imbalance_of(nc_config.get_setting("cifar10_balanced"), 500), labels, 10)
  assert set(kept) <= set(balanced)
  counts = np.bincount(labels[kept], minlength=10)
  assert counts.tolist() == [500] * 3 + [50] * 7


def _abstract_params(module) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_paper_grid_models_build_with_resnet18_shapes():
  paper = nc_config.SCALES["paper"]
  counts = {}
  for arm in nc_config.ARMS:
    for classes in (100, 10):
      cfg = models.get_config(paper.model_name(arm, classes))
      abstract = nnx.eval_shape(lambda: cfg.build(rngs=nnx.Rngs(0)))
      assert abstract.head.kernel.value.shape == (512, classes)
      assert cfg.state_shape == (4, 4, 512)
    counts[arm] = {"encoder": _abstract_params(abstract.encoder),
                   "total": _abstract_params(abstract)}
    graphdef, state = nnx.split(abstract)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x)[0],
                              state, jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32))
    assert features.shape == (2, 512)
  assert counts["explicit"]["encoder"] == counts["deq"]["encoder"]
  assert counts["explicit"]["total"] > counts["deq"]["total"]  # a second block
  # Encoder, transition and two blocks: the size of ResNet-18 on CIFAR-10 (11.2M).
  assert 10.8e6 < counts["explicit"]["total"] < 11.6e6, counts


def _synthetic_data(k=3, per_class=8, size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k), per_class)
  images = (rng.normal(size=(len(labels), size, size, 3)) + labels[:, None, None, None]
            ).astype(np.float32)
  split = nc_main.Split(images, labels)

  def batches():
    step = 0
    while True:
      order = np.random.default_rng([seed, step]).permutation(len(labels))[:8]
      yield {"image": images[order], "label": labels[order].astype(np.int32)}
      step += 1

  return nc_main.ArmData(train_batches=batches, steps_per_epoch=3, train=split,
                         test=split)


def test_smoke_run_writes_json_csv_png_and_checks_claims(tmp_path, monkeypatch):
  setting = nc_config.Setting("cifar10", 1, 2)
  monkeypatch.setattr(nc_config.Setting, "num_classes", property(lambda self: 3))
  scale = nc_config.Scale(name="smoke", model="nc_{arm}_cifar_cpu",
                          n_majority={"cifar10": 8}, epochs={"imbalanced": 1},
                          lr=0.01, eval_batch_size=16)
  tiny = dict(image_shape=(8, 8, 3), stem_width=4, stem_stride=1, encoder_widths=(4,),
              encoder_blocks=(0,), channels=4, inner_channels=4, num_groups=2,
              grad=jdeq.JFB())  # the cheapest gradient to compile: this tests plumbing
  arms = {arm: nc_main.run_arm(arm, setting, scale, _synthetic_data(), total_steps=2,
                               eval_points=1, model_overrides=tiny, log=lambda _: None)
          for arm in nc_config.ARMS}
  for result in arms.values():
    assert [r["step"] for r in result["records"]] == [0, 0, 2, 2]
    final = nc_main.final_row(result, "train")
    assert 0 <= final["accuracy"] <= 1 and final["nc1"] >= 0
    assert not np.isnan(final["accuracy_minority"])
  monkeypatch.setattr(nc_config, "get_setting", lambda name: setting)
  out = tmp_path / setting.name
  nc_main.write_setting(setting, arms, str(out), {})
  text = nc_main.write_summary({setting.name: arms}, str(tmp_path), {})
  for name in ("results.json", "curves.csv", "curves.png", "gram.png"):
    assert (out / name).stat().st_size > 0
  claims = json.loads((tmp_path / "summary.json").read_text())["claims"]
  assert [c["claim"][:2] for c in claims] == ["2a", "2b", "3:"]
  assert "claim" in text


def test_final_linear_features_of_any_classifier():
  from jdeq import analysis
  from jdeq.models.neural_collapse import final_linear_features
  model = models.create("mlp_deq_mnist", rngs=nnx.Rngs(0), width=8, hidden=8)
  images = np.random.default_rng(0).normal(size=(6, 28, 28, 1)).astype(np.float32)
  batches = [{"image": images, "label": np.arange(6) % 3,
              "mask": np.array([1, 1, 1, 1, 1, 0], np.float32)}]
  collected = analysis.extract_features(final_linear_features(model), batches)
  assert collected.features.shape == (5, 8) and collected.logits.shape == (5, 10)
  kernel = model.head.linear.kernel.value
  bias = model.head.linear.bias.value
  np.testing.assert_allclose(collected.features @ kernel + bias, collected.logits,
                             rtol=1e-4, atol=1e-5)

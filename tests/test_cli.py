"""The training CLI and the experiment registry: listing, overrides, clear errors."""

import os
import pathlib

import pytest

import jdeq
from experiments import configs
from experiments import train as cli
from jdeq import experiment as experiment_lib
from jdeq import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER_EXPERIMENTS = ("mnist_convdeq", "mdeq_cifar_tiny", "mdeq_cifar_tiny_20min",
                     "mdeq_cifar_large", "mdeq_imagenet_small", "mdeq_imagenet_large",
                     "mdeq_cityscapes_small", "mdeq_cityscapes_large",
                     "deq_transformer_wt103_postln", "deq_transformer_wt103_postln_jr",
                     "deq_transformer_wt103_preln_jr", "deq_transformer_wt2_small")


def _data_available():
  try:
    from jdeq import data
    return hasattr(data, "DataConfig")
  except ImportError:
    return False


needs_data = pytest.mark.skipif(not _data_available(),
                                reason="jdeq.data is not available")


def test_list_names_every_paper_experiment(capsys):
  assert cli.main(["--list"]) == 0
  listed = capsys.readouterr().out
  for name in PAPER_EXPERIMENTS:
    assert name in listed
  assert set(PAPER_EXPERIMENTS) <= set(configs.names())


def test_unknown_config_lists_valid_ones(capsys):
  assert cli.main(["--config", "mdeq_cifar_tin"]) == 2
  error = capsys.readouterr().err
  assert "unknown config 'mdeq_cifar_tin'" in error and "mdeq_cifar_tiny" in error


def test_parse_override_values():
  assert experiment_lib.parse_override("train.lr=0.01") == ("train.lr", 0.01)
  assert experiment_lib.parse_override("train.decay_epochs=(1, 2)") == (
      "train.decay_epochs", (1, 2))
  assert experiment_lib.parse_override("train.optimizer=sgd") == ("train.optimizer", "sgd")
  assert experiment_lib.parse_override("train.max_minutes=None") == ("train.max_minutes", None)
  with pytest.raises(ValueError, match="section.field=value"):
    experiment_lib.parse_override("train.lr")


@jdeq.config
class _DataStandIn:
  """The fields of a data configuration that the override tests touch."""
  name: str = "mnist"
  batch_size: int = 128


def _experiment():
  return experiment_lib.ExperimentConfig(model="conv_deq_mnist", data=_DataStandIn(),
                                train=train.TrainConfig(total_steps=10))


def test_overrides_address_nested_fields():
  experiment = experiment_lib.apply_overrides(
      _experiment(), ["train.lr=0.01", "data.batch_size=64", "train.optimizer=sgd",
                      "train.decay_epochs=(3, 6)"])
  assert experiment.train.lr == 0.01 and experiment.train.optimizer == "sgd"
  assert experiment.train.decay_epochs == (3, 6)
  assert experiment.data.batch_size == 64


BAD_OVERRIDES = [
    ("train.lrr=0.1", r"unknown option train.lrr; valid train options: \[.*'lr'"),
    ("data.batchsize=3", r"unknown option data.batchsize; valid data options: \[.*"
                         r"'batch_size'"),
    ("optim.lr=0.1", r"section one of \['model', 'data', 'train'\]"),
    ("train.optimizer=rmsprop", r"optimizer must be one of"),
    ("train.lr.x=1", r"train.lr: float has no fields"),
]


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES)
def test_bad_override_is_a_clear_error(override, expected):
  with pytest.raises(ValueError, match=expected):
    experiment_lib.apply_overrides(_experiment(), [override])


@needs_data
def test_cli_reports_bad_override(capsys):
  assert cli.main(["--config", "mdeq_cifar_tiny", "train.lrr=0.1"]) == 2
  error = capsys.readouterr().err
  assert "error: unknown option train.lrr" in error and "'lr'" in error


@needs_data
def test_missing_dataset_names_data_dir_option(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  empty = tmp_path / "no_data_here"
  empty.mkdir()
  code = cli.main(["--config", "mdeq_cifar_tiny", "--data-dir", str(empty),
                   "--workdir", str(tmp_path / "run"), "--no-progress"])
  error = capsys.readouterr().err
  assert code == 2
  assert "--data-dir" in error and "TFDS_DATA_DIR" in error


def test_registry_picks_up_new_modules():
  package = pathlib.Path(configs.__file__).parent
  modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
  assert {"mdeq_cifar", "mnist_convdeq"} <= modules
  with pytest.raises(ValueError, match="registered twice"):
    configs.register("mdeq_cifar_tiny")(lambda: None)


def test_finished_report_checks_the_experiment(tmp_path):
  import json
  from jdeq.train import reporting
  experiment = configs.get("mdeq_cifar_tiny_20min")
  with pytest.raises(ValueError, match="no report.json"):
    experiment_lib.finished_report(str(tmp_path), experiment)
  recorded = {"train": reporting.to_json(experiment.train),
              "data": dict(reporting.to_json(experiment.data), data_dir="/elsewhere")}
  (tmp_path / "report.json").write_text(json.dumps({"config": recorded, "step": 1}))
  assert experiment_lib.finished_report(str(tmp_path), experiment)["step"] == 1
  other = experiment_lib.apply_overrides(experiment, ["train.lr=0.01"])
  with pytest.raises(ValueError, match="different experiment: its train settings"):
    experiment_lib.finished_report(str(tmp_path), other)

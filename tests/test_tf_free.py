"""jdeq without TensorFlow: the array cache against real MNIST from TFDS, and
training and the benchmark in processes that cannot import tensorflow,
tensorflow_datasets, jaxopt, torch or torchdeq.

The TF-free processes get a ``sitecustomize`` module on ``PYTHONPATH`` that hides
those packages from every import finder before anything is imported, so
``import tensorflow`` fails and ``importlib.util.find_spec("tensorflow")`` is None,
as on a machine where they are not installed.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jdeq import data
from jdeq.data import array_cache, export, source

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HIDDEN = ("tensorflow", "tensorflow_datasets", "jaxopt", "torch", "torchdeq")
SUBPROCESS_TIMEOUT_S = 300

_SITECUSTOMIZE = f'''
import os, sys

HIDDEN = {HIDDEN!r}


class _Hiding:
  """Wraps an import finder; hidden packages are not found (as if not installed)."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      return None
    find = getattr(self._finder, "find_spec", None)
    return find(name, path, target) if find else None

  def __getattr__(self, attribute):
    return getattr(self._finder, attribute)


sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
with open(os.environ["JDEQ_TEST_HIDING_MARKER"], "a") as marker:
  marker.write(f"{{os.getpid()}}\\n")
'''


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir(tfds_data_dir):
  if not (tfds_data_dir / "mnist").is_dir():
    pytest.skip("no mnist in the test data directory")
  return tfds_data_dir


@pytest.fixture(scope="module")
def mnist_cache(mnist_dir, tmp_path_factory):
  """An array cache of real MNIST's test split, written by the export command.

  Only the 10k-example test split: decoding the 60k training images too would
  double the module's run time, and the tests slice their training data from it.
  """
  out = tmp_path_factory.mktemp("array_cache")
  code = export.main(["--data-dir", str(mnist_dir), "--out", str(out),
                      "--datasets", "mnist", "--splits", "test"])
  assert code == 0
  return out


@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
  """``run(args) -> CompletedProcess``: ``python args`` in the repository, with the
  TensorFlow, jaxopt and PyTorch packages hidden (checked to have been active)."""
  site = tmp_path_factory.mktemp("hiding_site")
  (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)

  def run(args, marker_dir):
    marker = pathlib.Path(marker_dir) / "hiding_marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO_ROOT)]),
               JDEQ_TEST_HIDING_MARKER=str(marker), JAX_PLATFORMS="cpu")
    env.pop("TFDS_DATA_DIR", None)
    finished = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
    assert marker.is_file(), "the import hiding was not active in the subprocess"
    return finished

  return run


@pytest.fixture(autouse=True)
def _fresh_caches():
  data.clear_cache()
  yield
  data.clear_cache()


def _take(iterator, count):
  batches = list(itertools.islice(iterator, count))
  iterator.close()
  return batches


def _mnist(data_dir, **overrides):
  options = dict(name="mnist", data_dir=str(data_dir), batch_size=128, augment=True,
                 seed=3, train_split="test[:1024]", eval_batch_size=1000, prefetch=0)
  return data.DataConfig(**{**options, **overrides})


# ---- the cache against TFDS (in this process, TensorFlow present) ---------------------


def test_cache_batches_are_bit_identical_to_tfds(mnist_dir, mnist_cache):
  from_tfds, from_cache = _mnist(mnist_dir), _mnist(mnist_cache)
  assert data.is_array_cache(str(mnist_cache)) and not data.is_array_cache(str(mnist_dir))
  assert data.dataset_info(from_cache) == data.dataset_info(from_tfds)
  np.testing.assert_array_equal(data.class_counts(from_cache),
                                data.class_counts(from_tfds))
  # 8 batches per epoch: 10 cover an epoch boundary; augmentation is on.
  expected = _take(data.train_batches(from_tfds), 10)
  fresh = _take(data.train_batches(from_cache), 10)
  resumed = _take(data.train_batches(from_cache, start_step=7), 3)
  for want, got in [*zip(expected, fresh), *zip(expected[7:], resumed)]:
    assert want.keys() == got.keys()
    for key in want:
      assert want[key].dtype == got[key].dtype
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  for want, got in zip(data.eval_batches(from_tfds), data.eval_batches(from_cache),
                       strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.parametrize("split", ["test", "test[:1000]", "test[-10%:]", "test[:33%]",
                                   "test[12.5%:13%]", "test[1:-1]", "test[9990:]",
                                   "test[0.015%:12.355%]"])  # 1.5 -> 2, 1235.5 -> 1236
def test_split_strings_select_what_tfds_selects(mnist_dir, mnist_cache, split):
  """The oracle is TFDS itself: the labels it reads for the same split string."""
  import tensorflow_datasets as tfds
  spec = data.get_spec("mnist")
  dataset = source.as_dataset(spec, str(mnist_dir), split,
                              decoders=tfds.decode.PartialDecoding({"label": True}))
  want = np.concatenate([np.zeros(0, np.int64)] + [
      batch["label"] for batch in dataset.batch(10_000).as_numpy_iterator()])
  assert array_cache.num_examples(str(mnist_cache), spec, split) == len(want)
  np.testing.assert_array_equal(
      array_cache.load_split(str(mnist_cache), spec, split)[1], want)


def test_bad_split_strings():
  sizes = {"train": 100, "test": 10}
  for split, message in [("validation", "unknown split 'validation'"),
                         ("train[:5]+test", "TFDS interleaves the parts of a sum"),
                         ("test[:11]", "beyond the split's 10"),
                         ("test[-200%:]", "beyond"),
                         ("test[1shard]", "not 'name' or"),
                         ("test[1.5:]", "must be an integer"),
                         ("test[a:]", "neither an integer nor a percentage"),
                         ("test[:]", "needs a start or a stop")]:
    with pytest.raises(ValueError, match=message):
      array_cache.resolve_split(split, sizes)
  assert array_cache.resolve_split("train[-10:]", sizes) == ("train", 90, 100)
  assert array_cache.resolve_split(" train[:-50%] ", sizes) == ("train", 0, 50)
  assert array_cache.resolve_split("test", sizes) == ("test", 0, 10)
  # Percent bounds round to the nearest example, ties to even (TFDS's "closest").
  assert array_cache.resolve_split("test[25%:35%]", sizes) == ("test", 2, 4)
  # TFDS interleaves the shards of a slice: a multi-shard split is only taken whole.
  shards = {"train": 4, "test": 1}
  assert array_cache.resolve_split("train", sizes, shards) == ("train", 0, 100)
  assert array_cache.resolve_split("train[0:100%]", sizes, shards) == ("train", 0, 100)
  assert array_cache.resolve_split("test[:5]", sizes, shards) == ("test", 0, 5)
  with pytest.raises(ValueError, match="has 4 TFDS shards"):
    array_cache.resolve_split("train[:50]", sizes, shards)


def test_data_dir_from_the_environment_may_be_a_cache(mnist_cache, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(mnist_cache))
  info = data.dataset_info(data.DataConfig(name="mnist", train_split="test[:64]"))
  assert info.num_train == 64 and info.num_test == 10_000


# ---- errors ----------------------------------------------------------------------------


def _small_cache(directory, mnist_cache):
  """A cache of MNIST's first 64 test examples (the real arrays, re-exported)."""
  spec = data.get_spec("mnist")
  images, labels = array_cache.load_split(str(mnist_cache), spec, "test[:64]")
  array_cache.write_dataset(str(directory), spec, {"test": (images, labels)},
                            source={"tfds_version": "test"})
  return directory


def _manifest(directory, name="mnist"):
  return json.loads((directory / name / "manifest.json").read_text())


def _corruptions():
  def drop_file(d):
    (d / "mnist" / "test.label.npy").unlink()

  def truncate(d):
    path = d / "mnist" / "test.image.npy"
    path.write_bytes(path.read_bytes()[:-7])

  def flip_a_pixel(d):
    path = d / "mnist" / "test.image.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))

  def wrong_shape(d):
    manifest = _manifest(d)
    manifest["splits"]["test"]["arrays"]["image"]["shape"] = [64, 28, 28, 3]
    (d / "mnist" / "manifest.json").write_text(json.dumps(manifest))

  def other_dataset(d):  # MNIST filed as CIFAR-10
    shutil.copytree(d / "mnist", d / "cifar10")

  def unreadable_manifest(d):
    (d / "mnist" / "manifest.json").write_text("{not json")

  def newer_format(d):
    (d / "jdeq_array_cache.json").write_text(json.dumps(
        {"format": "jdeq-array-cache", "version": 99}))

  def bad_labels(d):
    spec = data.get_spec("mnist")
    images, labels = array_cache.load_split(str(d), spec, "test")
    array_cache.clear_cache()
    array_cache.write_dataset(str(d), spec, {"test": (images, labels + 10)}, source={})

  return [("mnist", drop_file, "test.label.npy is missing"),
          ("mnist", truncate, "has .* bytes, the manifest records"),
          ("mnist", flip_a_pixel, "does not match its SHA-256"),
          ("mnist", wrong_shape, "the dataset needs uint8 \\[64, 28, 28, 1\\]"),
          ("cifar10", other_dataset, "dataset 'cifar10': its manifest has dataset "
                                     "'mnist'"),
          ("mnist", unreadable_manifest, "manifest.json is unreadable"),
          ("mnist", newer_format, "version 99"),
          ("mnist", bad_labels, "labels span \\[1\\d, 1\\d\\]")]


@pytest.mark.parametrize("name,corrupt,message", _corruptions(),
                         ids=[c[1].__name__ for c in _corruptions()])
def test_corrupt_or_mismatched_cache_is_a_clear_error(tmp_path, mnist_cache, name,
                                                     corrupt, message):
  cache = _small_cache(tmp_path, mnist_cache)
  assert next(data.eval_batches(_mnist(cache, train_split="test")))["mask"].sum() == 64
  data.clear_cache()
  corrupt(cache)
  with pytest.raises(data.ArrayCacheError, match=message) as error:
    cfg = _mnist(cache, name=name, train_split="test")
    data.dataset_info(cfg)
    next(data.eval_batches(cfg))
  assert "python -m jdeq.data.export" in str(error.value)
  assert isinstance(error.value, ValueError)  # the CLIs report ValueErrors cleanly


def test_dataset_missing_from_the_cache(tmp_path, mnist_cache):
  cache = _small_cache(tmp_path, mnist_cache)
  with pytest.raises(data.DatasetNotFoundError,
                     match="'cifar10' is not in the jdeq array cache.*holds \\['mnist'\\]"
                           ".*--datasets cifar10"):
    data.dataset_info(data.DataConfig(name="cifar10", data_dir=str(cache)))
  with pytest.raises(ValueError, match="unknown split 'train'.*holds \\['test'\\]"):
    data.dataset_info(data.DataConfig(name="mnist", data_dir=str(cache)))
  with pytest.raises(ValueError, match="split 'test\\[5:5\\]' of dataset 'mnist' is empty"):
    next(data.train_batches(data.DataConfig(name="mnist", data_dir=str(cache),
                                            train_split="test[5:5]")))
  with pytest.raises(ValueError, match="'imagenette' is read from TFDS.*array cache"):
    next(data.train_batches(data.DataConfig(name="imagenette", data_dir=str(cache))))


def test_without_tensorflow_or_cache_one_error_names_both_ways(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import now fails
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(data.TensorFlowUnavailableError) as error:
    data.dataset_info(data.DataConfig(name="cifar10", data_dir=str(tmp_path)))
  message = str(error.value)
  for part in ("'cifar10'", str(tmp_path), "tensorflow-datasets", "pip install",
               "python -m jdeq.data.export", "--datasets cifar10", "--data-dir"):
    assert part in message
  assert isinstance(error.value, FileNotFoundError)  # the CLIs report it cleanly
  with pytest.raises(data.TensorFlowUnavailableError,
                     match="'imagenette' is streamed from TFDS; an array cache holds"):
    next(data.train_batches(data.DataConfig(name="imagenette", data_dir=str(tmp_path))))


def test_export_refuses_what_it_cannot_write(tmp_path, mnist_dir, mnist_cache, capsys):
  with pytest.raises(SystemExit):  # argparse: not an in-memory dataset
    export.main(["--out", str(tmp_path), "--datasets", "imagenette"])
  assert "invalid choice" in capsys.readouterr().err
  for args, message in [
      (["--data-dir", str(mnist_cache), "--out", str(tmp_path)], "already an array cache"),
      (["--data-dir", str(mnist_dir), "--out", str(mnist_dir)], "TFDS data directory itself"),
      (["--data-dir", str(mnist_dir), "--out", str(tmp_path), "--datasets", "mnist",
        "--splits", "validation"], "no stored split 'validation'")]:
    assert export.main(args) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "jdeq_array_cache.json").exists()


def test_reexport_replaces_the_dataset_whole(tmp_path, mnist_cache):
  spec = data.get_spec("mnist")
  images, labels = array_cache.load_split(str(mnist_cache), spec, "test[:8]")
  array_cache.write_dataset(str(tmp_path), spec, {"train": (images, labels),
                                                  "test": (images, labels)}, source={})
  array_cache.write_dataset(str(tmp_path), spec, {"test": (images[:4], labels[:4])},
                            source={})
  assert sorted(os.listdir(tmp_path / "mnist")) == ["manifest.json", "test.image.npy",
                                                     "test.label.npy"]
  assert array_cache.num_examples(str(tmp_path), spec, "test") == 4
  assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# ---- TF-free processes -------------------------------------------------------------------


_READ_CACHE = textwrap.dedent("""
    import contextlib, io, sys
    import numpy as np
    try:
      import tensorflow
      sys.exit("tensorflow is importable")
    except ImportError:
      pass
    from jdeq import data
    from experiments import train

    cache, expected_path, empty, workdir = sys.argv[1:5]
    expected = np.load(expected_path)
    cfg = data.DataConfig(name="mnist", data_dir=cache, batch_size=128, augment=True,
                          seed=3, train_split="test[:1024]", eval_batch_size=1000,
                          prefetch=0)
    info = data.dataset_info(cfg)
    assert (info.num_train, info.num_test) == (1024, 10000), info
    batches = data.train_batches(cfg)
    for step in range(3):
      batch = next(batches)
      np.testing.assert_array_equal(batch["image"], expected[f"image{step}"])
      np.testing.assert_array_equal(batch["label"], expected[f"label{step}"])
    first_eval = next(data.eval_batches(cfg))
    np.testing.assert_array_equal(first_eval["image"], expected["eval_image"])
    try:
      data.dataset_info(data.DataConfig(name="mnist", data_dir=empty))
      sys.exit("no error without TensorFlow and without a cache")
    except data.TensorFlowUnavailableError as error:
      print("ERROR:", error)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      code = train.main(["--config", "mnist_convdeq", "--data-dir", empty,
                         "--workdir", workdir])
    print("CLI:", code, stderr.getvalue().strip())
    for name in ("tensorflow", "tensorflow_datasets", "jaxopt", "torch", "torchdeq"):
      assert name not in sys.modules, name
    print("OK")
""")


def test_tf_free_process_reads_the_cache_bit_identically(hidden, mnist_dir, mnist_cache,
                                                         tmp_path):
  batches = _take(data.train_batches(_mnist(mnist_dir)), 3)
  expected = {f"{key}{step}": batch[key] for step, batch in enumerate(batches)
              for key in ("image", "label")}
  expected["eval_image"] = next(data.eval_batches(_mnist(mnist_dir)))["image"]
  np.savez(tmp_path / "expected.npz", **expected)
  (tmp_path / "empty").mkdir()
  finished = hidden(["-c", _READ_CACHE, str(mnist_cache), str(tmp_path / "expected.npz"),
                     str(tmp_path / "empty"), str(tmp_path / "run")], tmp_path)
  assert finished.returncode == 0, finished.stderr[-3000:]
  lines = finished.stdout.splitlines()
  assert lines[-1] == "OK"
  error = next(line for line in lines if line.startswith("ERROR:"))
  cli = next(line for line in lines if line.startswith("CLI:"))
  for text in (error, cli):
    for part in ("tensorflow is not installed", "pip install tensorflow-cpu "
                 "tensorflow-datasets", "python -m jdeq.data.export --data-dir TFDS_DIR "
                 "--out CACHE_DIR --datasets mnist", "--data-dir CACHE_DIR"):
      assert part in text, (part, text)
  assert cli.startswith("CLI: 2 error: dataset 'mnist' cannot be read")


def test_training_from_the_cache_without_tensorflow(hidden, mnist_cache, tmp_path):
  workdir = tmp_path / "run"
  finished = hidden(
      ["-m", "experiments.train", "--config", "mnist_convdeq", "--data-dir",
       str(mnist_cache), "--workdir", str(workdir), "--no-progress",
       "train.total_steps=3", "train.epochs=None", "train.pretrain_steps=0",
       "train.warmup_steps=0", "train.jac_gamma=0", "train.max_eval_batches=1",
       "train.log_every=1", "train.checkpoint_every=None", "train.max_minutes=None",
       "data.batch_size=16", "data.eval_batch_size=16", "data.train_split=test[:256]",
       "model.channels=8", "model.inner_channels=16", "model.solver.max_iter=3",
       "model.eval_solver.max_iter=3"], tmp_path)
  assert finished.returncode == 0, finished.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["step"] == 3 and report["stopped"] == "completed"
  assert report["config"]["data"]["data_dir"] == str(mnist_cache)
  assert 0.0 <= report["test_accuracy"] <= 1.0 and np.isfinite(report["test_residual"])
  losses = [json.loads(line)["loss"] for line in
            (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]
  assert len(losses) == 3 and all(np.isfinite(losses))


def test_benchmark_w1_jdeq_side_without_tensorflow_or_torch(hidden, tmp_path):
  out = tmp_path / "bench"
  finished = hidden(
      ["-m", "experiments.bench", "--workloads", "w1", "--variants", "anderson/ift",
       "--rounds", "1", "--warmup", "0", "--scale", "0.01", "--no-memory",
       "--out", str(out), "--readme", "", "--torch-python", sys.executable], tmp_path)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "cannot import torch and torchdeq" in finished.stdout
  assert "running jdeq only" in finished.stdout
  results = json.loads((out / "results.json").read_text())
  (cell,) = results["cells"]
  assert (cell["workload"], cell["variant"]) == ("w1", "anderson/ift")
  assert "torch" not in cell and cell["jdeq"]["timings"]["step"]["median"] > 0
  assert cell["jdeq"]["counts"]["forward_evaluations"] == 30

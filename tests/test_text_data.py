"""jdeq.data text pipeline: the WikiText TFDS builder, the vocabulary, LM batches.

Real WikiText-2 (the official token files) is read through the builder's manual
directory when it is available; every other check runs on small synthetic corpora
in the official layout, prepared by the same builder.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from jdeq import data
from jdeq.data import text

FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens",
         "test": "wiki.test.tokens"}


# ---- independent oracles --------------------------------------------------------------


def _file_tokens(path) -> list[str]:
  """A token file's stream: whitespace split, ``<eos>`` after every line."""
  tokens = []
  with open(path, encoding="utf-8") as lines:
    for line in lines:
      tokens.extend(line.split())
      tokens.append("<eos>")
  return tokens


def _expected_symbols(token_lists) -> list[str]:
  """``<eos>``, then by (decreasing count, first occurrence) over the counted text."""
  counts, first = collections.Counter(), {}
  for token in itertools.chain.from_iterable(token_lists):
    if token == "<eos>":
      continue
    counts[token] += 1
    first.setdefault(token, len(first))
  return ["<eos>"] + sorted(counts, key=lambda w: (-counts[w], first[w]))


def _expected_segment(stream: np.ndarray, batch: int, length: int, segment: int):
  """Tokens / targets of segment ``segment``, indexed straight into the stream."""
  rows = len(stream) // batch
  starts = np.arange(batch)[:, None] * rows + segment * length + np.arange(length)
  return stream[starts], stream[starts + 1]


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


# ---- vocabulary: the order rule on examples worked out by hand --------------------------


def test_vocabulary_order_rule_by_hand():
  lines = ["e c", "b b b c", "", "d e c a"]
  # counts: c 3, b 3, e 2, d 1, a 1; first occurrences e < c < b < d < a.
  # Decreasing count, ties by first occurrence (not alphabetical): c, b (3), e (2),
  # d, a (1).
  vocab = text.build_vocabulary(lines)
  assert vocab.symbols == ("<eos>", "c", "b", "e", "d", "a")
  assert vocab.counts == (0, 3, 3, 2, 1, 1)
  # ids: <eos> 0, c 1, b 2, e 3, d 4, a 5; every line ends in <eos>, a blank one too.
  np.testing.assert_array_equal(vocab.encode_lines(lines),
                                [3, 1, 0, 2, 2, 2, 1, 0, 0, 4, 3, 1, 5, 0])
  assert vocab.decode([4, 0]) == ["d", "<eos>"]
  # min_freq stops at the first symbol counted fewer times; max_size keeps the
  # first max_size of the ordered list.
  assert text.build_vocabulary(lines, min_freq=2).symbols == ("<eos>", "c", "b", "e")
  assert text.build_vocabulary(lines, max_size=2).symbols == ("<eos>", "c", "b")
  # A special that is also counted comes first and is not repeated; it uses up
  # one of the max_size places.
  unk_lines = ["<unk> x <unk>", "y <unk> x"]  # <unk> 3, x 2, y 1
  assert text.build_vocabulary(unk_lines, specials=("<eos>", "<unk>")).symbols == (
      "<eos>", "<unk>", "x", "y")
  assert text.build_vocabulary(unk_lines, specials=("<eos>", "<unk>"),
                               max_size=2).symbols == ("<eos>", "<unk>", "x")


def test_vocabulary_unknown_tokens():
  with_unk = text.build_vocabulary(["a <unk>"])
  np.testing.assert_array_equal(with_unk.encode_lines(["a zz"]),
                                [with_unk.index("a"), with_unk.index("<unk>"), 0])
  with pytest.raises(ValueError, match="'zz' is not in the vocabulary"):
    text.build_vocabulary(["a b"]).encode_lines(["a zz"])
  with pytest.raises(ValueError, match="repeated symbols"):
    text.Vocabulary(["a", "b", "a"])


def test_unigram_perplexity_by_hand():
  # train: 0 0 0 1 -> p(0) = 3/4, p(1) = 1/4; eval 0 1: ppl = (3/4 * 1/4) ** -1/2.
  ppl = text.unigram_perplexity(np.array([0, 0, 0, 1]), np.array([0, 1]), 3)
  assert ppl == pytest.approx((3 / 16) ** -0.5, rel=1e-12)
  assert text.unigram_perplexity(np.array([0, 1]), np.array([2]), 3) == math.inf


# ---- config ---------------------------------------------------------------------------


def test_config_validation():
  cfg = data.TextDataConfig(name="wikitext2", tgt_len=70)
  assert cfg.eval_len == 70 and cfg.vocab_source == ("train", "validation", "test")
  assert data.TextDataConfig(name="wikitext103", eval_tgt_len=10).eval_len == 10
  assert data.TextDataConfig().vocab_source == ("train",)
  assert data.TextDataConfig(vocab_splits=["train"]).vocab_splits == ("train",)
  assert data.TextDataConfig(manual_dir=pathlib.Path("x")).manual_dir == "x"
  with pytest.raises(ValueError, match=r"unknown text dataset 'ptb'.*'wikitext103', "
                                       r"'wikitext2'"):
    data.TextDataConfig(name="ptb")
  with pytest.raises(ValueError, match="batch_size must be > 0"):
    data.TextDataConfig(batch_size=0)
  with pytest.raises(ValueError, match="tgt_len must be an int"):
    data.TextDataConfig(tgt_len=1.5)
  with pytest.raises(ValueError, match="eval_tgt_len must be > 0"):
    data.TextDataConfig(eval_tgt_len=0)
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['valid'\]"):
    data.TextDataConfig(vocab_splits=("train", "valid"))
  with pytest.raises(ValueError, match="download must be True or False"):
    data.TextDataConfig(download="yes")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['bptt'\]"):
    data.TextDataConfig(bptt=70)


def test_text_module_imports_without_tensorflow():
  code = ("import sys\n"
          "sys.modules['tensorflow'] = None\n"
          "sys.modules['tensorflow_datasets'] = None\n"
          "import jdeq.data.text as t\n"
          "print(t.TextDataConfig(name='wikitext2').name)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "wikitext2"


# ---- the TFDS builder on synthetic corpora in the official layout ------------------------


def _synthetic_lines(rng, count: int, words: list[str]) -> list[str]:
  probs = 1.0 / np.arange(1, len(words) + 1)
  probs /= probs.sum()
  lines = []
  for _ in range(count):
    size = int(rng.integers(0, 25))
    lines.append(" ".join(rng.choice(words, size=size, p=probs)) if size else "")
  return lines


def _write_corpus(directory: pathlib.Path) -> dict:
  """Three token files; "zzp zzq" ties in train, valid makes zzq more frequent."""
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(40)] + ["<unk>", "@-@", "="]
  contents = {"train": ["", " = Title = ", "zzp zzq"] + _synthetic_lines(rng, 300, words),
              "validation": ["zzq zzq"] + _synthetic_lines(rng, 40, words),
              "test": _synthetic_lines(rng, 50, words)}
  directory.mkdir(parents=True, exist_ok=True)
  for split, lines in contents.items():
    (directory / FILES[split]).write_text(" \n".join(lines) + " \n", encoding="utf-8")
  return contents


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """A synthetic WikiText-2 prepared from a manual directory: (config, files dir)."""
  pytest.importorskip("tensorflow_datasets")
  root = tmp_path_factory.mktemp("synthetic")
  _write_corpus(root / "manual")
  cfg = data.TextDataConfig(name="wikitext2", data_dir=str(root / "tfds"),
                            manual_dir=str(root / "manual"), batch_size=4, tgt_len=7,
                            eval_batch_size=3, eval_tgt_len=9)
  data.text_info(cfg)  # prepares the TFDS dataset once
  return cfg, root / "manual"


def test_builder_keeps_every_line_in_order(synthetic):
  import tensorflow_datasets as tfds
  from jdeq.data import wikitext
  cfg, manual = synthetic
  builder = tfds.builder("wikitext/wikitext2", data_dir=cfg.data_dir)
  assert isinstance(builder, wikitext.Wikitext) and builder.info.disable_shuffling
  for split in text.SPLITS:
    expected = (manual / FILES[split]).read_text(encoding="utf-8").split("\n")[:-1]
    assert list(wikitext.read_lines(builder, split)) == expected
    # The same through TFDS's own reader, in order.
    via_tfds = [example["text"].decode("utf-8") for example in
                builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()]
    assert via_tfds == expected
    assert builder.info.splits[split].num_examples == len(expected)


def test_token_streams_and_vocabulary_match_the_files(synthetic):
  cfg, manual = synthetic
  streams = {split: _file_tokens(manual / FILES[split]) for split in text.SPLITS}
  vocab = data.vocabulary(cfg)
  # WikiText-2 counts train, validation and test, in that order (the reference).
  assert list(vocab.symbols) == _expected_symbols(streams[s] for s in text.SPLITS)
  for split in text.SPLITS:
    ids = data.token_ids(cfg, split)
    assert ids.dtype == np.int32 and not ids.flags.writeable
    assert vocab.decode(ids) == streams[split]
  info = data.text_info(cfg)
  assert info.vocab_size == len(vocab)
  assert info.num_tokens == {s: len(streams[s]) for s in text.SPLITS}
  # The tie zzp/zzq (one each in train) is broken by validation's two zzq.
  assert vocab.index("zzq") < vocab.index("zzp")
  train_only = data.vocabulary(
      data.TextDataConfig(name="wikitext2", data_dir=cfg.data_dir, vocab_splits=("train",)))
  assert list(train_only.symbols) == _expected_symbols([streams["train"]])
  assert train_only.index("zzq") == train_only.index("zzp") + 1


def test_unigram_perplexity_of_the_corpus(synthetic):
  cfg, manual = synthetic
  train = collections.Counter(_file_tokens(manual / FILES["train"]))
  valid = _file_tokens(manual / FILES["validation"])
  total = sum(train.values())
  expected = math.exp(-sum(math.log(train[w] / total) for w in valid) / len(valid))
  assert data.text_info(cfg).unigram_perplexity == pytest.approx(expected, rel=1e-9)


def test_train_batches_cut_and_resume(synthetic):
  cfg, _ = synthetic
  stream = data.token_ids(cfg, "train")
  rows = len(stream) // cfg.batch_size
  steps = (rows - 1) // cfg.tgt_len
  assert data.text_info(cfg).steps_per_epoch == steps and steps > 3
  run = _take(data.lm_train_batches(cfg), 2 * steps + 3)  # crosses two epochs
  for k, batch in enumerate(run):
    assert set(batch) == {"tokens", "targets", "reset"}
    assert batch["tokens"].shape == batch["targets"].shape == (cfg.batch_size, cfg.tgt_len)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
    assert batch["reset"].dtype == np.float32
    np.testing.assert_array_equal(batch["reset"], float(k % steps == 0))
    tokens, targets = _expected_segment(stream, cfg.batch_size, cfg.tgt_len, k % steps)
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["targets"], targets)
  # Columns continue across segments, targets are the tokens shifted by one.
  for first, second in zip(run[:steps - 1], run[1:steps]):
    np.testing.assert_array_equal(first["targets"][:, :-1], first["tokens"][:, 1:])
    np.testing.assert_array_equal(second["tokens"][:, 0], first["targets"][:, -1])
  # Resume anywhere (mid-epoch, at and after an epoch boundary) is exact.
  for k in (1, steps - 1, steps, steps + 2, 2 * steps + 2):
    resumed = _take(data.lm_train_batches(cfg, start_step=k), 1)[0]
    for key in run[k]:
      np.testing.assert_array_equal(resumed[key], run[k][key])
  with pytest.raises(ValueError, match="start_step must be an int >= 0"):
    data.lm_train_batches(cfg, start_step=-1)
  too_long = data.TextDataConfig(**{**_fields(cfg), "tgt_len": rows})
  with pytest.raises(ValueError, match="too short for one segment"):
    data.lm_train_batches(too_long)


def _fields(cfg):
  return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def _check_eval_pass(cfg, split):
  """Every scored position of the trimmed split appears once; returns the batches."""
  stream = data.token_ids(cfg, split)
  batch_size, length = cfg.eval_batch_size, cfg.eval_len
  rows = len(stream) // batch_size
  cols = stream[:rows * batch_size].reshape(batch_size, rows)
  batches = list(data.lm_eval_batches(cfg, split))
  assert len(batches) == math.ceil((rows - 1) / length)
  assert data.text_info(cfg).eval_steps[split] == len(batches)
  mask = np.concatenate([b["mask"] for b in batches], axis=1)
  assert mask.sum() == batch_size * (rows - 1)
  np.testing.assert_array_equal(mask[:, :rows - 1], 1.0)
  np.testing.assert_array_equal(mask[:, rows - 1:], 0.0)
  tokens = np.concatenate([b["tokens"] for b in batches], axis=1)
  targets = np.concatenate([b["targets"] for b in batches], axis=1)
  np.testing.assert_array_equal(tokens[:, :rows - 1], cols[:, :-1])
  np.testing.assert_array_equal(targets[:, :rows - 1], cols[:, 1:])
  np.testing.assert_array_equal(tokens[:, rows - 1:], 0)
  for index, batch in enumerate(batches):
    assert set(batch) == {"tokens", "targets", "mask", "reset"}
    assert batch["tokens"].shape == batch["mask"].shape == (batch_size, length)
    assert batch["mask"].dtype == batch["reset"].dtype == np.float32
    np.testing.assert_array_equal(batch["reset"], float(index == 0))
  return batches


def test_eval_batches_cover_the_split_once(synthetic):
  cfg, _ = synthetic
  for split in ("validation", "test"):
    batches = _check_eval_pass(cfg, split)
    assert batches[-1]["mask"].sum() < cfg.eval_batch_size * cfg.eval_len  # padded
  with pytest.raises(ValueError, match="unknown split 'valid'"):
    data.lm_eval_batches(cfg, "valid")


# ---- preparation: manual directory layouts, the archive, download, errors ---------------


def test_missing_manual_dir_names_the_option(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  missing = tmp_path / "nowhere"
  cfg = data.TextDataConfig(name="wikitext2", data_dir=str(tmp_path / "tfds"),
                            manual_dir=str(missing))
  with pytest.raises(data.TextDataNotFoundError) as error:
    data.text_info(cfg)
  message = str(error.value)
  for needle in ("does not exist", str(missing), "TextDataConfig.manual_dir",
                 "data.manual_dir=PATH", "wiki.train.tokens", "wiki.valid.tokens",
                 "wiki.test.tokens", "wikitext-2-v1.zip"):
    assert needle in message
  # Neither prepared nor a manual directory nor download: the same guidance.
  unprepared = data.TextDataConfig(name="wikitext103", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.TextDataNotFoundError,
                     match=r"WikiText-103 is not prepared.*TextDataConfig\.manual_dir.*"
                           r"wikitext-103-v1\.zip"):
    data.lm_train_batches(unprepared)
  # A directory without the files lists what it lacks.
  (tmp_path / "wrong").mkdir()
  (tmp_path / "wrong" / "wiki.train.tokens").write_text("a\n")
  wrong = data.TextDataConfig(name="wikitext2", data_dir=str(tmp_path / "tfds"),
                              manual_dir=str(tmp_path / "wrong"))
  with pytest.raises(data.TextDataNotFoundError,
                     match=r"lacks \['wiki\.valid\.tokens', 'wiki\.test\.tokens'\]"):
    data.text_info(wrong)
  # The builder used directly through TFDS says the same.
  import tensorflow_datasets as tfds
  import jdeq.data.wikitext  # noqa: F401  (registers the builder)
  builder = tfds.builder("wikitext/wikitext2", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.TextDataNotFoundError, match="manual_dir"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(missing)))


def test_wikitext103_archive_folder_and_zip_layouts(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  contents = _write_corpus(tmp_path / "unzipped" / "wikitext-103")
  with zipfile.ZipFile(tmp_path / "wikitext-103-v1.zip", "w") as archive:
    for split in text.SPLITS:
      archive.write(tmp_path / "unzipped" / "wikitext-103" / FILES[split],
                    f"wikitext-103/{FILES[split]}")
  (tmp_path / "zipped").mkdir()
  (tmp_path / "wikitext-103-v1.zip").rename(tmp_path / "zipped" / "wikitext-103-v1.zip")
  expected = _file_tokens(tmp_path / "unzipped" / "wikitext-103" / FILES["train"])
  for layout in ("unzipped", "zipped"):
    cfg = data.TextDataConfig(name="wikitext103", data_dir=str(tmp_path / f"tfds_{layout}"),
                              manual_dir=str(tmp_path / layout), batch_size=2, tgt_len=5)
    vocab = data.vocabulary(cfg)
    assert vocab.decode(data.token_ids(cfg, "train")) == expected
    # WikiText-103 counts the train split only: the zzp/zzq tie stays in order.
    assert vocab.index("zzq") == vocab.index("zzp") + 1
  assert len(contents["validation"]) == data.text_info(cfg).num_tokens["validation"] - sum(
      len(line.split()) for line in contents["validation"])


def test_download_uses_the_official_archive(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  _write_corpus(tmp_path / "extracted" / "wikitext-2")
  requested = []

  def fake_download_and_extract(self, url):
    requested.append(url)
    return tmp_path / "extracted"

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      fake_download_and_extract)
  cfg = data.TextDataConfig(name="wikitext2", data_dir=str(tmp_path / "tfds"),
                            download=True)
  assert data.text_info(cfg).num_tokens["test"] == len(
      _file_tokens(tmp_path / "extracted" / "wikitext-2" / FILES["test"]))
  assert requested == [
      "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"]


# ---- real WikiText-2 ------------------------------------------------------------------


def _wikitext2_dir() -> pathlib.Path | None:
  candidates = [os.environ.get("JDEQ_WIKITEXT2_DIR"),
                pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"]
  for candidate in candidates:
    if candidate and all((pathlib.Path(candidate) / f).is_file() for f in FILES.values()):
      return pathlib.Path(candidate)
  return None


@pytest.fixture(scope="session")
def wikitext2(tmp_path_factory):
  """Real WikiText-2 prepared once into a temporary TFDS data dir: (config, dir)."""
  pytest.importorskip("tensorflow_datasets")
  found = _wikitext2_dir()
  if found is None:
    pytest.skip("real WikiText-2 token files not found: set JDEQ_WIKITEXT2_DIR to a "
                "directory holding wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens")
  cfg = data.TextDataConfig(name="wikitext2", data_dir=str(tmp_path_factory.mktemp("wt2")),
                            manual_dir=str(found), batch_size=20, tgt_len=70,
                            eval_batch_size=10, eval_tgt_len=150)
  start = time.perf_counter()
  data.text_info(cfg)
  print(f"\nWikiText-2 prepared and decoded in {time.perf_counter() - start:.1f} s")
  return cfg, found


def test_wikitext2_standard_counts(wikitext2):
  cfg, _ = wikitext2
  info = data.text_info(cfg)
  # Merity et al. (2016), Table 1, with one <eos> per line.
  assert info.num_tokens == {"train": 2_088_628, "validation": 217_646, "test": 245_569}
  assert info.vocab_size == 33_278
  assert info.steps_per_epoch == (2_088_628 // 20 - 1) // 70
  assert info.eval_steps["validation"] == math.ceil((217_646 // 10 - 1) / 150)


def test_wikitext2_vocabulary_and_streams(wikitext2):
  cfg, files = wikitext2
  streams = {split: _file_tokens(files / FILES[split]) for split in text.SPLITS}
  vocab = data.vocabulary(cfg)
  assert list(vocab.symbols) == _expected_symbols(streams[s] for s in text.SPLITS)
  assert vocab.symbols[:6] == ("<eos>", "the", ",", ".", "<unk>", "of")
  assert vocab.decode(data.token_ids(cfg, "validation")) == streams["validation"]
  # The unigram baseline against an independent count.
  train = collections.Counter(streams["train"])
  total = sum(train.values())
  expected = math.exp(-sum(c * math.log(train[w] / total) for w, c in
                           collections.Counter(streams["validation"]).items())
                      / len(streams["validation"]))
  assert data.text_info(cfg).unigram_perplexity == pytest.approx(expected, rel=1e-9)


def test_wikitext2_batches(wikitext2):
  cfg, files = wikitext2
  vocab = data.vocabulary(cfg)
  stream = np.array([vocab.index(t) for t in _file_tokens(files / FILES["train"])])
  steps = data.text_info(cfg).steps_per_epoch
  for k in (0, 1, steps - 1, steps, steps + 5):
    batch = _take(data.lm_train_batches(cfg, start_step=k), 1)[0]
    tokens, targets = _expected_segment(stream, cfg.batch_size, cfg.tgt_len, k % steps)
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["targets"], targets)
    np.testing.assert_array_equal(batch["reset"], float(k % steps == 0))
  _check_eval_pass(cfg, "validation")

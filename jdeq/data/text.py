"""WikiText language-modelling data: vocabulary, token streams and LM batches.

Usage::

  from jdeq import data
  cfg = data.TextDataConfig(name="wikitext103", batch_size=56, tgt_len=150,
                            manual_dir="path/to/wikitext-103")  # or download=True
  info = data.text_info(cfg)       # vocab_size, num_tokens, steps_per_epoch, ...
  for batch in data.lm_train_batches(cfg, start_step=0):  # infinite
    ...  # {"tokens": int32 (B, L), "targets": int32 (B, L), "reset": float32 (B,)}
  for batch in data.lm_eval_batches(cfg, "validation"):   # one pass, "mask" marks padding
    ...

Data. The splits are read through the TFDS builder of :mod:`jdeq.data.wikitext`
(one example per line of ``wiki.{train,valid,test}.tokens``, in file order), which
prepares them once from a manual directory or the official archive. Each line is
split on whitespace (``str.split()``) and ``<eos>`` is appended, blank lines
included; a split's token stream is the concatenation over its lines. This is the
tokenization of the DEQ-Transformer's reference code (locuslab/deq,
``DEQ-Sequence``, which takes its data handling from Transformer-XL) and gives the
standard WikiText counts (``docs/text_data.md``).

Vocabulary (:func:`build_vocabulary`). ``<eos>`` gets id 0; then every symbol
counted, by decreasing count, ties broken by first occurrence in the counted text
(the order of a stable sort by count); no minimum frequency and no size limit for
WikiText, whose ``<unk>`` is an ordinary token. As in the reference, the counted
text is the train split for WikiText-103 and train, validation and test (in that
order) for WikiText-2; ``TextDataConfig.vocab_splits`` overrides it. Every type
of WikiText's validation and test splits occurs in its train split, so this choice
changes the order of WikiText-2's ids (the counts add up over the three splits),
not its 33,278 types. Frequency order matters: adaptive softmax and adaptive input
cutoffs assume that low ids are frequent.

Batching. With a split's stream ``x_0 … x_{N-1}``, ``B`` columns and ``n = N // B``
(the remainder ``N - nB`` is dropped, as in the reference), column ``b`` is
``c_b[t] = x_{bn + t}`` for ``0 <= t < n``. Segment ``s`` of length ``L`` holds
``tokens[b] = c_b[sL : sL + L]`` and ``targets[b] = c_b[sL + 1 : sL + L + 1]``,
so consecutive segments continue every column and a column's last token is never
an input, its first never a target. Training (:func:`lm_train_batches`) uses the
``S = (n - 1) // L`` full segments of an epoch, in order, every epoch the same (the
reference's ordered iterator has no randomness): batch ``k`` is segment
``k % S``, a pure function of ``(config, k)``, so resuming at any step is exact.
The reference's last, shorter segment of each epoch (``(n - 1) - SL`` positions
per column) is dropped so that every batch has a static shape. Evaluation
(:func:`lm_eval_batches`) uses every segment with ``B = eval_batch_size`` and
``L = eval_tgt_len``, the last one zero-padded with a mask, which scores all
``B (n - 1)`` positions once, as the reference's evaluation does.

Memory. ``reset`` is 1 on the first segment of each epoch (and on the first
evaluation batch): the model clears its segment memory there, as the reference
starts every epoch and every evaluation with empty memory.

Token ids are decoded once per process and kept in memory (read-only int32
arrays). This module imports TensorFlow Datasets only when it reads data.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import threading
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from jdeq import config, require, require_positive

SPLITS = ("train", "validation", "test")
EOS = "<eos>"
UNK = "<unk>"
FILE_NAMES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens",
              "test": "wiki.test.tokens"}
# The address of the official archives used by the reference code's data script.
ARCHIVE_URL_ROOT = "https://s3.amazonaws.com/research.metamind.io/wikitext/"


class WikiTextSpec(NamedTuple):
  """One WikiText variant.

  Attributes:
    name: the ``TextDataConfig.name`` and TFDS builder config name.
    title: human-readable name.
    folder: the folder of the token files inside the official archive.
    archive: the official archive's file name.
    vocab_splits: the splits the reference code counts for the vocabulary.
  """
  name: str
  title: str
  folder: str
  archive: str
  vocab_splits: tuple[str, ...]

  @property
  def url(self) -> str:
    """The official archive's download address."""
    return ARCHIVE_URL_ROOT + self.archive


WIKITEXT = {
    "wikitext2": WikiTextSpec("wikitext2", "WikiText-2", "wikitext-2",
                              "wikitext-2-v1.zip", ("train", "validation", "test")),
    "wikitext103": WikiTextSpec("wikitext103", "WikiText-103", "wikitext-103",
                                "wikitext-103-v1.zip", ("train",)),
}


class TextDataNotFoundError(FileNotFoundError):
  """WikiText is neither prepared nor available from the given manual directory."""


def list_text_datasets() -> list[str]:
  """The valid ``TextDataConfig.name`` values."""
  return sorted(WIKITEXT)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@config
class TextDataConfig:
  """A WikiText language-modelling pipeline (see :func:`lm_train_batches`).

  The defaults are the reference DEQ-Transformer's WikiText-103 settings
  (batch 56, segments of 150 tokens, evaluation batch 16).

  Attributes:
    name: ``"wikitext2"`` or ``"wikitext103"``.
    batch_size: ``B``, training columns (every training batch has this size).
    tgt_len: ``L``, tokens per training segment.
    eval_batch_size: evaluation columns.
    eval_tgt_len: tokens per evaluation segment (None: ``tgt_len``).
    seed: unused by the batchers, kept for symmetry with ``DataConfig`` (a
      model may draw its dropout keys from it). The reference's ordered LM
      iterator has no randomness (every epoch visits the same segments in the
      same order), and neither has this one.
    data_dir: TFDS data directory; None uses the ``TFDS_DATA_DIR`` environment
      variable, else TFDS's default directory.
    manual_dir: directory holding ``wiki.train.tokens``, ``wiki.valid.tokens``
      and ``wiki.test.tokens`` (or the archive's folder of them, or the archive
      itself); used once, to prepare the TFDS dataset in ``data_dir``.
    download: if the dataset is not prepared and no ``manual_dir`` is given,
      download the official archive to prepare it (needs the internet). False
      raises :class:`TextDataNotFoundError` instead.
    vocab_splits: the splits whose text is counted for the vocabulary, in order
      (None: the reference's choice, see :attr:`vocab_source`).
  """
  name: str = "wikitext103"
  batch_size: int = 56
  tgt_len: int = 150
  eval_batch_size: int = 16
  eval_tgt_len: Optional[int] = None
  seed: int = 0
  data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  download: bool = False
  vocab_splits: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    names = list_text_datasets()
    require(self.name in WIKITEXT, self,
            f"unknown text dataset {self.name!r}; valid datasets: {names}")
    sizes = dict(batch_size=self.batch_size, tgt_len=self.tgt_len,
                 eval_batch_size=self.eval_batch_size)
    if self.eval_tgt_len is not None:
      sizes["eval_tgt_len"] = self.eval_tgt_len
    for field, value in sizes.items():
      require(_is_int(value), self, f"{field} must be an int, got {value!r}")
    require_positive(self, **sizes)
    require(_is_int(self.seed), self, f"seed must be an int, got {self.seed!r}")
    require(isinstance(self.download, bool), self,
            f"download must be True or False, got {self.download!r}")
    for field in ("data_dir", "manual_dir"):
      value = getattr(self, field)
      require(value is None or isinstance(value, (str, os.PathLike)), self,
              f"{field} must be a path or None, got {value!r}")
      if isinstance(value, os.PathLike):  # keeps the config hashable and printable
        object.__setattr__(self, field, os.fspath(value))
    if self.vocab_splits is not None:
      require(isinstance(self.vocab_splits, (str, list, tuple)), self,
              f"vocab_splits must be a tuple of split names or None, got "
              f"{self.vocab_splits!r}")
      splits = ((self.vocab_splits,) if isinstance(self.vocab_splits, str)
                else tuple(self.vocab_splits))
      require(len(splits) > 0, self, "vocab_splits must name at least one split")
      unknown = [s for s in splits if s not in SPLITS]
      require(not unknown, self,
              f"vocab_splits has unknown split(s) {unknown}; valid: {list(SPLITS)}")
      require(len(set(splits)) == len(splits), self,
              f"vocab_splits repeats a split: {list(splits)}")
      object.__setattr__(self, "vocab_splits", splits)

  @property
  def spec(self) -> WikiTextSpec:
    """The WikiText variant."""
    return WIKITEXT[self.name]

  @property
  def eval_len(self) -> int:
    """Tokens per evaluation segment."""
    return self.tgt_len if self.eval_tgt_len is None else self.eval_tgt_len

  @property
  def vocab_source(self) -> tuple[str, ...]:
    """The splits counted for the vocabulary (``vocab_splits`` or the reference's)."""
    return self.vocab_splits if self.vocab_splits is not None else self.spec.vocab_splits


class TextInfo(NamedTuple):
  """What a model and a training loop need to know about a text dataset.

  Attributes:
    vocab_size: number of token types (``<eos>`` included).
    num_tokens: tokens per split (``"train"``, ``"validation"``, ``"test"``),
      ``<eos>`` included, before any trimming to the batch size.
    steps_per_epoch: training batches per epoch, ``S = (N // B - 1) // L``.
    unigram_perplexity: validation perplexity of the maximum-likelihood unigram
      model of the train split (see :func:`unigram_perplexity`); a reference line
      that any language model should beat by far.
    eval_steps: evaluation batches per split, ``ceil((N // B - 1) / L)`` with the
      evaluation batch size and length.
  """
  vocab_size: int
  num_tokens: dict
  steps_per_epoch: int
  unigram_perplexity: float
  eval_steps: dict


# ---- vocabulary -----------------------------------------------------------------------


def tokenize(line: str) -> list[str]:
  """A line's tokens: split on whitespace, then ``<eos>`` (so ``""`` is ``[<eos>]``)."""
  return line.split() + [EOS]


class Vocabulary:
  """An immutable symbol table: ``symbols[i]`` has id ``i``.

  Attributes:
    symbols: the symbols in id order.
    counts: how often each symbol was counted when the vocabulary was built
      (0 for special symbols that were not counted).
  """

  def __init__(self, symbols: Sequence[str], counts: Optional[Sequence[int]] = None):
    self.symbols = tuple(symbols)
    self.counts = tuple(counts) if counts is not None else (0,) * len(self.symbols)
    if len(self.counts) != len(self.symbols):
      raise ValueError(f"Vocabulary: {len(self.symbols)} symbols but "
                       f"{len(self.counts)} counts")
    self._index = {symbol: i for i, symbol in enumerate(self.symbols)}
    if len(self._index) != len(self.symbols):
      duplicates = [s for s, c in collections.Counter(self.symbols).items() if c > 1]
      raise ValueError(f"Vocabulary: repeated symbols {duplicates[:10]}")

  def __len__(self) -> int:
    return len(self.symbols)

  def __contains__(self, symbol: str) -> bool:
    return symbol in self._index

  def __repr__(self) -> str:
    head = ", ".join(repr(s) for s in self.symbols[:5])
    return f"Vocabulary({len(self)} symbols: {head}, ...)"

  def index(self, symbol: str) -> int:
    """The id of ``symbol`` (KeyError if it is not in the vocabulary)."""
    return self._index[symbol]

  @property
  def eos_id(self) -> int:
    """The id of ``<eos>``."""
    return self._index[EOS]

  def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
    """The int32 token stream of ``lines`` (each line :func:`tokenize`-d).

    A token outside the vocabulary becomes ``<unk>`` when the vocabulary has it,
    as in the reference; otherwise it is a ``ValueError`` naming the token.
    """
    table: dict = {}
    return _finalize(self, table, _scan(lines, table))

  def decode(self, ids: Iterable[int]) -> list[str]:
    """The symbols of ``ids``."""
    return [self.symbols[int(i)] for i in np.asarray(ids).reshape(-1)]


def build_vocabulary(lines: Iterable[str], *, specials: Sequence[str] = (EOS,),
                     min_freq: int = 0, max_size: Optional[int] = None) -> Vocabulary:
  """The reference's frequency-ordered vocabulary of ``lines``.

  The rule (Transformer-XL's vocabulary, used by the DEQ-Transformer): ``specials``
  first, in the given order; then the whitespace-split tokens of ``lines`` (the
  appended ``<eos>`` is not counted) by decreasing count, equal counts in the order
  of their first occurrence in ``lines``. Of that ordered list the first ``max_size`` entries are
  considered (all if None), a special among them is not repeated, and the list
  stops at the first symbol counted fewer than ``min_freq`` times. WikiText uses
  ``min_freq=0, max_size=None``.

  Args:
    lines: the counted text, one string per line (several splits: chain them).
    specials: symbols placed first, counted or not.
    min_freq: smallest count kept.
    max_size: how many counted symbols are considered (None: all).

  Returns:
    A :class:`Vocabulary` whose ``counts`` are the counted frequencies.
  """
  table: dict = {}
  return _rank(table, [_scan(lines, table)], specials=specials, min_freq=min_freq,
               max_size=max_size)


# One pass over the text does both the counting and the encoding: every token gets
# a provisional id in the order of its first occurrence (so these ids already
# order ties as the rule wants), the counts are a bincount of the provisional
# stream, and the final ids are a table lookup once the vocabulary is known.
# _EOL marks the <eos> appended to each line, which is never counted.
_EOL = -1


def _scan(lines: Iterable[str], table: dict, chunk_lines: int = 8192) -> np.ndarray:
  """Provisional int32 ids of the :func:`tokenize`-d lines (``_EOL`` for ``<eos>``)."""
  chunks, ids = [], []
  assign = table.setdefault
  for count, line in enumerate(lines, 1):
    for token in line.split():
      ids.append(assign(token, len(table)))
    ids.append(_EOL)
    if count % chunk_lines == 0:  # int32 chunks: 4 bytes a token, not a Python int
      chunks.append(np.asarray(ids, np.int32))
      ids = []
  chunks.append(np.asarray(ids, np.int32))
  return np.concatenate(chunks)


def _rank(table: dict, counted: Sequence[np.ndarray], *, specials: Sequence[str],
          min_freq: int, max_size: Optional[int]) -> Vocabulary:
  """The vocabulary of the provisional streams ``counted`` (see build_vocabulary)."""
  if max_size is not None and not (_is_int(max_size) and max_size >= 0):
    raise ValueError(f"build_vocabulary: max_size must be an int >= 0 or None, "
                     f"got {max_size!r}")
  provisional = list(table)
  counts = np.zeros(len(provisional), np.int64)
  for stream in counted:
    counts += np.bincount(stream[stream != _EOL], minlength=len(provisional))
  # Decreasing count; the stable sort keeps first-occurrence order among ties.
  ordered = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
  if max_size is not None:
    ordered = ordered[:max_size]
  symbols, frequencies, seen = [], [], set()
  for symbol in specials:
    if symbol not in seen:
      symbols.append(symbol)
      frequencies.append(int(counts[table[symbol]]) if symbol in table else 0)
      seen.add(symbol)
  for index in ordered:
    if counts[index] < min_freq:
      break
    if provisional[index] not in seen:
      symbols.append(provisional[index])
      frequencies.append(int(counts[index]))
      seen.add(provisional[index])
  return Vocabulary(symbols, frequencies)


def _finalize(vocab: Vocabulary, table: dict, stream: np.ndarray) -> np.ndarray:
  """The final ids of a provisional stream; out-of-vocabulary tokens become <unk>."""
  fallback = vocab._index.get(UNK, -1)
  lookup = np.array([vocab._index.get(symbol, fallback) for symbol in table] +
                    [vocab.eos_id], np.int32)  # the last entry serves _EOL = -1
  ids = lookup[stream]
  if np.any(ids < 0):
    token = list(table)[int(stream[np.argmax(ids < 0)])]
    raise ValueError(f"token {token!r} is not in the vocabulary, which has no "
                     f"{UNK!r} symbol to stand for it")
  return ids


# ---- the corpus: prepared once, decoded once per process --------------------------------


class _Corpus(NamedTuple):
  vocab: Vocabulary
  ids: dict  # split -> read-only int32 (N,)


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
  # Same rule as the image pipelines; repeated here so that this module needs no
  # TensorFlow until it reads data.
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR") or None


def _read_corpus(cfg: TextDataConfig, data_dir: Optional[str]) -> _Corpus:
  from jdeq.data import wikitext  # imports TensorFlow Datasets
  builder = wikitext.prepared_builder(cfg.name, data_dir=data_dir,
                                      manual_dir=cfg.manual_dir, download=cfg.download)

  # The counted splits are scanned first, in order, so that provisional ids follow
  # first occurrence in the counted text.
  order = list(cfg.vocab_source) + [s for s in SPLITS if s not in cfg.vocab_source]
  table: dict = {}
  provisional = {split: _scan(wikitext.read_lines(builder, split), table)
                 for split in order}
  vocab = _rank(table, [provisional[s] for s in cfg.vocab_source], specials=(EOS,),
                min_freq=0, max_size=None)
  ids = {}
  for split in SPLITS:
    ids[split] = _finalize(vocab, table, provisional.pop(split))
    ids[split].setflags(write=False)
  return _Corpus(vocab, ids)


def _corpus(cfg: TextDataConfig) -> _Corpus:
  # Keyed by what determines the ids; manual_dir and download only matter for the
  # one-time preparation.
  data_dir = _resolve_data_dir(cfg.data_dir)
  key = (cfg.name, data_dir, cfg.vocab_source)
  with _CACHE_LOCK:
    if key not in _CACHE:
      _CACHE[key] = _read_corpus(cfg, data_dir)
    return _CACHE[key]


def clear_text_cache() -> None:
  """Forgets every decoded corpus (the next read decodes again)."""
  with _CACHE_LOCK:
    _CACHE.clear()


def vocabulary(cfg: TextDataConfig) -> Vocabulary:
  """The vocabulary of ``cfg``'s dataset (see :func:`build_vocabulary`)."""
  return _corpus(cfg).vocab


def token_ids(cfg: TextDataConfig, split: str) -> np.ndarray:
  """A split's whole token stream, read-only int32 ``(N,)``, in file order."""
  _check_split(split)
  return _corpus(cfg).ids[split]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


# ---- statistics -----------------------------------------------------------------------


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray,
                       vocab_size: int) -> float:
  """``exp(-(1/M) sum_j log p(y_j))`` with ``p(w) = count_train(w) / N_train``.

  The maximum-likelihood unigram model of the train stream (``<eos>`` counted like
  any token), evaluated on every token of the evaluation stream. Nothing is
  smoothed: if an evaluated token never occurs in the train stream its probability
  is 0 and the perplexity is ``inf``. WikiText has no such token (``<unk>`` is an
  ordinary, frequent token and every validation type occurs in train).
  """
  train_ids, eval_ids = np.asarray(train_ids), np.asarray(eval_ids)
  if train_ids.size == 0 or eval_ids.size == 0:
    raise ValueError("unigram_perplexity: empty token stream")
  counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64)
  eval_counts = np.bincount(eval_ids, minlength=vocab_size).astype(np.float64)
  used = eval_counts > 0
  if np.any(counts[used] == 0):
    return math.inf
  log_p = np.log(counts[used]) - math.log(train_ids.size)
  return float(math.exp(-np.sum(eval_counts[used] * log_p) / eval_ids.size))


def _train_steps(rows: int, length: int) -> int:
  return max(rows - 1, 0) // length


def _eval_steps(rows: int, length: int) -> int:
  return -(-max(rows - 1, 0) // length)


def text_info(cfg: TextDataConfig) -> TextInfo:
  """Vocabulary size, split sizes, steps per epoch and the unigram baseline of ``cfg``."""
  corpus = _corpus(cfg)
  num_tokens = {split: int(corpus.ids[split].size) for split in SPLITS}
  steps = _train_steps(num_tokens["train"] // cfg.batch_size, cfg.tgt_len)
  eval_steps = {split: _eval_steps(num_tokens[split] // cfg.eval_batch_size,
                                   cfg.eval_len) for split in SPLITS}
  return TextInfo(vocab_size=len(corpus.vocab), num_tokens=num_tokens,
                  steps_per_epoch=steps,
                  unigram_perplexity=unigram_perplexity(
                      corpus.ids["train"], corpus.ids["validation"], len(corpus.vocab)),
                  eval_steps=eval_steps)


# ---- batching -------------------------------------------------------------------------


def columns(ids: np.ndarray, batch_size: int) -> np.ndarray:
  """``(B, n)`` view of the stream: row ``b`` is ``ids[b n : (b + 1) n]``, ``n = N // B``.

  The last ``N - nB`` tokens are dropped.
  """
  rows = len(ids) // batch_size
  return np.asarray(ids)[:rows * batch_size].reshape(batch_size, rows)


def lm_train_batches(cfg: TextDataConfig, start_step: int = 0) -> Iterator[dict]:
  """Infinite training batches, from batch ``start_step`` on.

  Batch ``k`` is segment ``s = k % S`` of the ``B = batch_size`` columns of the
  train stream (epoch ``k // S``; every epoch is the same, the reference's order),
  ``S = steps_per_epoch``; see the module docstring for the cut. Resuming at
  ``start_step = k`` yields exactly what an uninterrupted run yields from batch
  ``k`` on, without reading the skipped batches.

  Yields:
    ``{"tokens": int32 (B, L), "targets": int32 (B, L), "reset": float32 (B,)}``:
    ``targets`` are ``tokens`` shifted one position along each column, ``reset`` is
    1 on the first segment of every epoch and 0 elsewhere.

  Raises:
    ValueError: ``start_step < 0``, or the stream is too short for one segment.
  """
  return stream_train_batches(_corpus(cfg).ids["train"], cfg.batch_size, cfg.tgt_len,
                              start_step, name=f"{cfg.name} train split")


def stream_train_batches(ids: np.ndarray, batch_size: int, tgt_len: int,
                         start_step: int = 0, *,
                         name: str = "token stream") -> Iterator[dict]:
  """:func:`lm_train_batches` over an in-memory token stream ``ids`` (same cut).

  Raises:
    ValueError: ``start_step < 0``, or the stream is too short for one segment
      (the message names the stream as ``name``).
  """
  if not _is_int(start_step) or start_step < 0:
    raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
  data = columns(ids, batch_size)
  steps = _train_steps(data.shape[1], tgt_len)
  if steps == 0:
    raise ValueError(
        f"{name} ({data.size} tokens after trimming) is too short for one segment "
        f"of batch_size={batch_size}, tgt_len={tgt_len}: each column needs "
        f"tgt_len + 1 = {tgt_len + 1} tokens")
  return _train_iterator(data, steps, tgt_len, int(start_step))


def _train_iterator(data: np.ndarray, steps: int, length: int,
                    start: int) -> Iterator[dict]:
  batch = data.shape[0]
  for step in itertools.count(start):
    segment = step % steps
    begin = segment * length
    yield {"tokens": np.array(data[:, begin:begin + length]),
           "targets": np.array(data[:, begin + 1:begin + 1 + length]),
           "reset": np.full((batch,), float(segment == 0), np.float32)}


def lm_eval_batches(cfg: TextDataConfig, split: str) -> Iterator[dict]:
  """One pass over ``split`` in segments, the memory to be carried by the caller.

  ``B = eval_batch_size`` columns, segments of ``L = eval_len`` tokens; the last
  segment is zero-padded to ``L``. Every one of the ``B (n - 1)`` scored positions
  (``n = N // B``) appears exactly once with mask 1, so the split's loss is
  ``sum(mask * nll) / sum(mask)``.

  Args:
    cfg: the pipeline.
    split: ``"validation"`` or ``"test"`` (``"train"`` is accepted too).

  Yields:
    ``{"tokens": int32 (B, L), "targets": int32 (B, L), "mask": float32 (B, L),
    "reset": float32 (B,)}``; ``reset`` is 1 on the first batch only, padding has
    token and target 0 and mask 0.
  """
  _check_split(split)
  return stream_eval_batches(_corpus(cfg).ids[split], cfg.eval_batch_size,
                             cfg.eval_len, name=f"{cfg.name} {split} split")


def stream_eval_batches(ids: np.ndarray, batch_size: int, tgt_len: int, *,
                        name: str = "token stream") -> Iterator[dict]:
  """:func:`lm_eval_batches` over an in-memory token stream ``ids`` (same cut).

  Raises:
    ValueError: the stream leaves a column fewer than 2 tokens.
  """
  data = columns(ids, batch_size)
  if data.shape[1] < 2:
    raise ValueError(
        f"{name} ({len(ids)} tokens) is too short for eval_batch_size={batch_size}: "
        f"each column needs 2 tokens")
  return _eval_iterator(data, tgt_len)


def _eval_iterator(data: np.ndarray, length: int) -> Iterator[dict]:
  batch, rows = data.shape
  for index in range(_eval_steps(rows, length)):
    begin = index * length
    size = min(length, rows - 1 - begin)
    tokens = np.zeros((batch, length), np.int32)
    targets = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.float32)
    tokens[:, :size] = data[:, begin:begin + size]
    targets[:, :size] = data[:, begin + 1:begin + 1 + size]
    mask[:, :size] = 1.0
    yield {"tokens": tokens, "targets": targets, "mask": mask,
           "reset": np.full((batch,), float(index == 0), np.float32)}


def manual_dir_help(spec: WikiTextSpec) -> str:
  """How to point the pipeline at a copy of ``spec``'s files (for error messages)."""
  files = ", ".join(FILE_NAMES[s] for s in SPLITS)
  return (f"Set TextDataConfig.manual_dir (command line: data.manual_dir=PATH; TFDS: "
          f"tfds.download.DownloadConfig(manual_dir=PATH)) to a directory holding "
          f"{files}, or their folder {spec.folder}/ from the official archive, or the "
          f"archive {spec.archive} itself; or set TextDataConfig.download=True "
          f"(data.download=True) to download {spec.url}. Preparation happens once: "
          f"afterwards the TFDS data directory (TextDataConfig.data_dir, --data-dir or "
          f"TFDS_DATA_DIR) is enough.")

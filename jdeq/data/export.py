"""Exports the in-memory datasets of a TFDS data directory to an array cache.

  python -m jdeq.data.export --data-dir TFDS_DIR --out CACHE_DIR [--datasets mnist cifar10]
      [--splits train test]

Run once where TensorFlow and TensorFlow Datasets are installed; afterwards
``--data-dir CACHE_DIR`` (``DataConfig.data_dir``, or ``TFDS_DATA_DIR``) trains
from the cache with numpy alone. Every split TFDS records for a dataset is decoded by
the same code the pipelines use (:func:`jdeq.data.source.decode_split`), so batches
from the cache are bit-identical to batches from TFDS. The layout, the manifest and
the checks made on reading are described in :mod:`jdeq.data.array_cache`.

Without ``--datasets``, every in-memory dataset (MNIST, CIFAR-10/100) prepared in the
TFDS directory is exported; a named one that is not there is an error. Without
``--splits``, every split TFDS records for it (a cache without a split reports it as
unknown when it is asked for). Exporting a dataset again replaces it whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

from jdeq.data import array_cache, source
from jdeq.data.specs import get_spec, in_memory_datasets


def export(data_dir: Optional[str], out: str,
           names: Optional[Sequence[str]] = None,
           splits: Optional[Sequence[str]] = None,
           log: Callable[[str], None] = print) -> dict[str, dict]:
  """Writes the named in-memory datasets of ``data_dir`` into the cache ``out``.

  Args:
    data_dir: TFDS data directory (None: ``TFDS_DATA_DIR``, else TFDS's default).
    out: the array cache directory (created if needed; other datasets in it stay).
    names: datasets to export (None: every in-memory dataset prepared there).
    splits: stored splits to export, plain names like ``"train"`` (None: all).
    log: receives one progress line per split.

  Returns:
    ``{dataset: manifest}`` of what was written.

  Raises:
    ValueError: a name is not an in-memory dataset, a split is not stored,
      ``data_dir`` is itself an array cache, ``out`` is the TFDS directory, or no
      dataset was found.
    DatasetNotFoundError: a named dataset is not prepared in ``data_dir`` (a
      :class:`~jdeq.data.source.TensorFlowUnavailableError` without TensorFlow).
  """
  data_dir = source.resolve_data_dir(data_dir)
  allowed = in_memory_datasets()
  for name in names or ():
    if name not in allowed:
      raise ValueError(f"dataset {name!r} cannot be exported: an array cache holds "
                       f"the in-memory datasets {allowed}")
  if array_cache.is_array_cache(data_dir):
    raise ValueError(f"{data_dir!r} is already an array cache; pass the TFDS data "
                     "directory it should be exported from")
  if data_dir and os.path.realpath(data_dir) == os.path.realpath(out):
    raise ValueError(f"--out {out!r} is the TFDS data directory itself; choose a "
                     "directory of its own for the array cache")
  chosen = list(names) if names else [n for n in allowed if _prepared(n, data_dir)]
  if not chosen:
    raise ValueError(f"none of the in-memory datasets {allowed} is prepared in the "
                     f"TFDS data directory {data_dir!r}")
  _, tfds = source.tensorflow_modules(get_spec(chosen[0]), data_dir)
  written = {}
  for name in chosen:
    spec = get_spec(name)
    info = source.builder(name, data_dir).info
    stored = sorted(info.splits.keys())
    if not stored:
      raise source.not_found_error(spec, data_dir)
    for split in splits or ():
      if split not in stored:
        raise ValueError(f"dataset {name!r} has no stored split {split!r}; TFDS "
                         f"records {stored} (slices are taken when reading)")
    arrays = {}
    for split in splits or stored:
      started = time.perf_counter()
      arrays[split] = source.decode_split(spec, data_dir, split)
      images = arrays[split][0]
      log(f"{name} {split}: {len(images)} examples, {images.nbytes / 2**20:.1f} MiB "
          f"decoded in {time.perf_counter() - started:.1f} s")
    shard_lengths = {split: list(info.splits[split].shard_lengths) for split in arrays}
    written[name] = array_cache.write_dataset(
        out, spec, arrays, shard_lengths=shard_lengths, source={"tfds_version": str(info.version),
                                   "tensorflow_datasets_version": tfds.__version__,
                                   "exported_by": "jdeq.data.export"})
    log(f"{name}: written to {os.path.join(out, name)} (TFDS {spec.tfds_name} "
        f"{info.version})")
  return written


def _prepared(name: str, data_dir: Optional[str]) -> bool:
  try:
    return bool(source.builder(name, data_dir).is_prepared())
  except source.TensorFlowUnavailableError:
    raise
  except source.DatasetNotFoundError:
    return False


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m jdeq.data.export",
      description="Export in-memory TFDS datasets to a jdeq array cache (plain .npy "
                  "arrays that training reads without TensorFlow).")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory to read (default: $TFDS_DATA_DIR)")
  parser.add_argument("--out", required=True, help="array cache directory to write")
  parser.add_argument("--datasets", nargs="+", default=None,
                      choices=in_memory_datasets(),
                      help="datasets to export (default: every in-memory dataset "
                           "prepared in --data-dir)")
  parser.add_argument("--splits", nargs="+", default=None,
                      help="stored splits to export, e.g. train test (default: all "
                           "that TFDS records)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  try:
    written = export(args.data_dir, args.out, args.datasets, args.splits,
                     log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"array cache {args.out}: {', '.join(written)}; train from it with "
        f"--data-dir {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The array cache: in-memory datasets as plain ``.npy`` arrays, read without TensorFlow.

The in-memory datasets (MNIST, CIFAR-10/100) are decoded once into a uint8 image
array and an int32 label array per split (:func:`jdeq.data.source.load_in_memory`).
``python -m jdeq.data.export`` writes exactly those arrays to a directory, once, on a
machine with TensorFlow; training then reads them with numpy alone. Batches are drawn
from the arrays by the same numpy code either way, so a cache gives bit-identical
batches to the TFDS data it was exported from.

Layout of a cache directory::

  CACHE_DIR/jdeq_array_cache.json     marks the directory: {"format", "version", ...}
  CACHE_DIR/<dataset>/manifest.json   the dataset's manifest (below)
  CACHE_DIR/<dataset>/<split>.image.npy   uint8 (N, H, W, C)
  CACHE_DIR/<dataset>/<split>.label.npy   int32 (N,)

A dataset's manifest records the registry name, the TFDS name and version it was
exported from, the number of classes, the image shape and, per split, its number of
examples, its TFDS shard lengths and for each array its file, dtype, shape, file size in bytes and the SHA-256
of the array's C-order data. Every read checks all of them (and the label range);
any difference raises :class:`ArrayCacheError` naming the file and the fix.

A directory is recognised as a cache by its ``jdeq_array_cache.json``, so
``DataConfig.data_dir`` (``--data-dir``, ``TFDS_DATA_DIR``) names either a TFDS data
directory or a cache. Split strings follow TFDS's slicing syntax where plain slicing
gives TFDS's examples in TFDS's order: a whole split, or one slice such as
``"train[:2048]"`` or ``"train[10%:-5%]"`` (percent bounds round to the nearest
example, as TFDS's default rounding does) of a split stored in one TFDS shard, as
MNIST's and CIFAR's are. Sums (``"train+test"``) and slices of multi-shard splits are
refused: TFDS interleaves their file pieces, an order the cache does not reproduce.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jdeq.data.specs import DatasetSpec, get_spec

ROOT_MANIFEST = "jdeq_array_cache.json"
DATASET_MANIFEST = "manifest.json"
FORMAT = "jdeq-array-cache"
VERSION = 1
FIELDS = ("image", "label")
EXPORT_COMMAND = "python -m jdeq.data.export --data-dir TFDS_DIR --out CACHE_DIR"


class ArrayCacheError(ValueError):
  """An array cache is corrupt, incomplete, or holds other data than its manifest says."""


def is_array_cache(directory: Optional[str]) -> bool:
  """Whether ``directory`` is an array cache (holds ``jdeq_array_cache.json``)."""
  return bool(directory) and os.path.isfile(os.path.join(directory, ROOT_MANIFEST))


def datasets_in(cache_dir: str) -> list[str]:
  """Names of the datasets exported to ``cache_dir`` (those with a manifest)."""
  if not os.path.isdir(cache_dir):
    return []
  return sorted(name for name in os.listdir(cache_dir)
                if os.path.isfile(os.path.join(cache_dir, name, DATASET_MANIFEST)))


def export_hint(name: str, cache_dir: str = "CACHE_DIR") -> str:
  """The command that exports dataset ``name`` into ``cache_dir``."""
  return (f"python -m jdeq.data.export --data-dir TFDS_DIR --out {cache_dir} "
          f"--datasets {name}")


# ---- split strings -------------------------------------------------------------------

_PART = re.compile(r"^(?P<split>[\w-]+)(?:\[(?P<start>[^:\[\]]*):(?P<stop>[^:\[\]]*)\])?$")
_BOUND = re.compile(r"^(?P<value>-?\d+(?:\.\d*)?)(?P<percent>%?)$")


def resolve_split(split: str, sizes: Mapping[str, int],
                  shards: Optional[Mapping[str, int]] = None) -> tuple[str, int, int]:
  """A TFDS-style split string as the row range ``(split, start, stop)`` it selects.

  Only forms whose example order TFDS reproduces by plain slicing are accepted: TFDS
  interleaves the file pieces of a sum (``"a+b"``) and of a slice that spans several
  shards, in blocks, so the cache could select the same examples but not in TFDS's
  order, and batches would differ.

  Args:
    split: ``"name"`` or ``"name[a:b]"`` with integer or percent (``10%``) bounds,
      negative bounds counting from the end, either one omitted.
    sizes: examples per stored split.
    shards: TFDS shards per stored split (None: one each); a split of several
      shards is only taken whole.

  Returns:
    The stored split and the ``[start, stop)`` range of its rows.

  Raises:
    ValueError: an unknown split name, a malformed string, a bound beyond the
      split's size, or a form the cache does not reproduce (sums, TFDS shard
      units, slices of a multi-shard split).
  """
  text = split.strip()
  if "+" in text:
    raise ValueError(f"split {split!r}: the array cache takes one split or one slice; "
                     "TFDS interleaves the parts of a sum, an order it does not "
                     "reproduce")
  match = _PART.match(text)
  if not match:
    raise ValueError(f"split {split!r} is not 'name' or 'name[start:stop]' (integer or "
                     "percent bounds; the array cache has no shard units)")
  name = match["split"]
  if name not in sizes:
    raise ValueError(f"split {split!r}: unknown split {name!r}; the array cache "
                     f"holds {sorted(sizes)}")
  size = sizes[name]
  if match["start"] is None:
    return name, 0, size
  bounds = [match["start"].strip(), match["stop"].strip()]
  if not any(bounds):
    raise ValueError(f"split {split!r}: a slice needs a start or a stop bound")
  parsed = [_BOUND.match(bound) if bound else None for bound in bounds]
  for bound, found in zip(bounds, parsed):
    if bound and not found:
      raise ValueError(f"split {split!r}: bound {bound!r} is neither an integer nor a "
                       "percentage")
  percent = any(found and found["percent"] for found in parsed)
  begin, end = (_to_index(found, size, percent, split) if found else default
                for found, default in zip(parsed, (0, size)))
  count = (shards or {}).get(name, 1)
  if count > 1 and (begin, end) != (0, size):
    raise ValueError(f"split {split!r}: the stored split {name!r} has {count} TFDS "
                     "shards, and TFDS interleaves the shards of a slice, an order the "
                     f"array cache does not reproduce; use the whole split {name!r}")
  return name, begin, end


def _to_index(found: re.Match, size: int, percent: bool, split: str) -> int:
  text = found["value"]
  if percent:
    # Python's round (to even on ties), TFDS's "closest" rounding.
    index = int(round(float(text) * size / 100.0))
  elif "." in text:
    raise ValueError(f"split {split!r}: example bound {text!r} must be an integer")
  else:
    index = int(text)
  if abs(index) > size:
    raise ValueError(f"split {split!r}: bound {text}{'%' if percent else ''} is "
                     f"beyond the split's {size} examples")
  return index + size if index < 0 else index


def _split_range(manifest: Mapping[str, Any], split: str) -> tuple[str, int, int]:
  splits = manifest["splits"]
  return resolve_split(split, {name: entry["num_examples"] for name, entry in splits.items()},
                       {name: len(entry["shard_lengths"]) for name, entry in splits.items()})


def num_examples(cache_dir: str, spec: DatasetSpec, split: str) -> int:
  """Examples that ``split`` (a split string) selects from the cache."""
  _, start, stop = _split_range(read_manifest(cache_dir, spec), split)
  return max(stop - start, 0)


def load_split(cache_dir: str, spec: DatasetSpec, split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 (N, H, W, C), labels int32 (N,))`` of ``split``, read-only.

  Each stored split is read and verified once per process; a slice is a view of it.

  Raises:
    ArrayCacheError: the cache or this dataset's files do not match the manifest or
      the dataset's spec.
    ValueError: the split string selects nothing, is malformed, or has a form whose
      TFDS order the cache does not reproduce (see :func:`resolve_split`).
  """
  name, start, stop = _split_range(read_manifest(cache_dir, spec), split)
  images, labels = _read_split(cache_dir, spec, name)
  images, labels = images[start:stop], labels[start:stop]
  if len(labels) == 0:
    raise ValueError(f"split {split!r} of dataset {spec.name!r} is empty")
  return images, labels


def clear_cache() -> None:
  """Forgets the stored splits read so far."""
  _read_split_cached.cache_clear()


def _read_split(cache_dir: str, spec: DatasetSpec, split: str
                ) -> tuple[np.ndarray, np.ndarray]:
  return _read_split_cached(cache_dir, spec.name, split)


@functools.lru_cache(maxsize=8)
def _read_split_cached(cache_dir: str, name: str, split: str
                       ) -> tuple[np.ndarray, np.ndarray]:
  spec = get_spec(name)
  manifest = read_manifest(cache_dir, spec)
  entry = manifest["splits"][split]
  count = entry["num_examples"]
  expected = {"image": ("uint8", [count, *spec.image_shape]),
              "label": ("int32", [count])}
  arrays = {}
  for field in FIELDS:
    record = entry["arrays"][field]
    path = os.path.join(cache_dir, spec.name, record["file"])
    problem = _check_record(record, *expected[field])
    if problem:
      raise _corrupt(cache_dir, spec, f"the manifest's {split}/{field} entry {problem}")
    arrays[field] = _read_array(cache_dir, spec, path, record)
  labels = arrays["label"]
  if count and (labels.min() < 0 or labels.max() >= spec.num_classes):
    raise _corrupt(cache_dir, spec, f"{split} labels span [{labels.min()}, "
                                    f"{labels.max()}], outside the dataset's "
                                    f"{spec.num_classes} classes")
  for array in arrays.values():
    array.setflags(write=False)
  return arrays["image"], arrays["label"]


def _check_record(record: Mapping[str, Any], dtype: str, shape: list[int]
                  ) -> Optional[str]:
  if record.get("dtype") != dtype or list(record.get("shape", ())) != shape:
    return (f"says {record.get('dtype')} {record.get('shape')}, the dataset needs "
            f"{dtype} {shape}")
  return None


def _read_array(cache_dir: str, spec: DatasetSpec, path: str,
                record: Mapping[str, Any]) -> np.ndarray:
  if not os.path.isfile(path):
    raise _corrupt(cache_dir, spec, f"{os.path.basename(path)} is missing")
  size = os.path.getsize(path)
  if size != record["file_bytes"]:
    raise _corrupt(cache_dir, spec, f"{os.path.basename(path)} has {size} bytes, the "
                                    f"manifest records {record['file_bytes']}")
  try:
    array = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as error:
    raise _corrupt(cache_dir, spec, f"{os.path.basename(path)} is no readable .npy "
                                    f"file ({error})") from error
  if str(array.dtype) != record["dtype"] or list(array.shape) != list(record["shape"]):
    raise _corrupt(cache_dir, spec, f"{os.path.basename(path)} holds {array.dtype} "
                                    f"{list(array.shape)}, the manifest records "
                                    f"{record['dtype']} {record['shape']}")
  if array_digest(array) != record["sha256"]:
    raise _corrupt(cache_dir, spec, f"{os.path.basename(path)} does not match its "
                                    "SHA-256 checksum")
  return array


def _corrupt(cache_dir: str, spec: DatasetSpec, problem: str) -> ArrayCacheError:
  return ArrayCacheError(
      f"array cache {cache_dir!r}, dataset {spec.name!r}: {problem}. Export it again "
      f"with `{export_hint(spec.name, cache_dir)}`.")


def array_digest(array: np.ndarray) -> str:
  """SHA-256 (hex) of ``array``'s data in C order (its shape and dtype excluded)."""
  return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def read_manifest(cache_dir: str, spec: DatasetSpec) -> dict[str, Any]:
  """The validated manifest of ``spec``'s dataset in ``cache_dir``.

  Raises:
    FileNotFoundError: the dataset was not exported to this cache.
    ArrayCacheError: the cache's format is unknown, or the manifest is unreadable,
      describes another dataset, or disagrees with the dataset's spec.
  """
  root = _read_json(os.path.join(cache_dir, ROOT_MANIFEST), cache_dir, spec)
  if root.get("format") != FORMAT or root.get("version") != VERSION:
    raise ArrayCacheError(
        f"{os.path.join(cache_dir, ROOT_MANIFEST)} describes format "
        f"{root.get('format')!r} version {root.get('version')!r}; this jdeq reads "
        f"{FORMAT!r} version {VERSION}. Export the cache again with `{EXPORT_COMMAND}`.")
  path = os.path.join(cache_dir, spec.name, DATASET_MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  manifest = _read_json(path, cache_dir, spec)
  wanted = {"format": FORMAT, "version": VERSION, "dataset": spec.name,
            "tfds_name": spec.tfds_name, "num_classes": spec.num_classes,
            "image_shape": list(spec.image_shape)}
  for key, value in wanted.items():
    if manifest.get(key) != value:
      raise _corrupt(cache_dir, spec, f"its manifest has {key} "
                                      f"{manifest.get(key)!r}, expected {value!r}")
  splits = manifest.get("splits")
  if not isinstance(splits, dict) or not splits:
    raise _corrupt(cache_dir, spec, "its manifest lists no splits")
  for split, entry in splits.items():
    try:
      records = [entry["arrays"][field] for field in FIELDS]
      ok = (isinstance(entry["num_examples"], int)
            and isinstance(entry["shard_lengths"], list)
            and sum(entry["shard_lengths"]) == entry["num_examples"]) and all(
          isinstance(r["file"], str) and isinstance(r["file_bytes"], int)
          and isinstance(r["sha256"], str) for r in records)
    except (KeyError, TypeError):
      ok = False
    if not ok:
      raise _corrupt(cache_dir, spec, f"its manifest's split {split!r} lacks "
                                      "num_examples, shard_lengths adding up to it, "
                                      "or an array's file, file_bytes or sha256")
  return manifest


def _read_json(path: str, cache_dir: str, spec: DatasetSpec) -> dict[str, Any]:
  try:
    with open(path) as handle:
      value = json.load(handle)
  except (OSError, ValueError) as error:
    raise ArrayCacheError(f"array cache {cache_dir!r}: {path} is unreadable ({error}). "
                          f"Export it again with `{export_hint(spec.name, cache_dir)}`."
                          ) from error
  if not isinstance(value, dict):
    raise ArrayCacheError(f"array cache {cache_dir!r}: {path} is not a JSON object")
  return value


# ---- writing ---------------------------------------------------------------------------


def write_dataset(cache_dir: str, spec: DatasetSpec,
                  splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  source: Mapping[str, Any],
                  shard_lengths: Optional[Mapping[str, Sequence[int]]] = None
                  ) -> dict[str, Any]:
  """Writes ``spec``'s splits and their manifest into ``cache_dir``; returns it.

  Every file is written to a temporary name in its directory and renamed into
  place. The dataset's old manifest (if any) is removed first and the new one
  written last, so an interrupted export leaves the dataset absent, never a
  manifest that describes half-written arrays; the arrays of splits the new
  manifest does not list are removed after it.

  Args:
    cache_dir: the cache directory (created if needed).
    spec: the dataset.
    splits: ``{split: (images uint8 (N, H, W, C), labels int32 (N,))}``.
    source: provenance for the manifest (TFDS version and the like).
    shard_lengths: ``{split: examples per TFDS shard}`` of the source (None, or a
      split missing: one shard); slices of a multi-shard split are refused on
      reading (:func:`resolve_split`).
  """
  dataset_dir = os.path.join(cache_dir, spec.name)
  os.makedirs(dataset_dir, exist_ok=True)
  manifest_path = os.path.join(dataset_dir, DATASET_MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  entries = {}
  for split, (images, labels) in splits.items():
    if not re.fullmatch(r"[\w-]+", split):
      raise ValueError(f"split name {split!r} is not a plain name")
    images, labels = np.asarray(images), np.asarray(labels)
    _check_arrays(spec, split, images, labels)
    arrays = {}
    for field, array in (("image", images), ("label", labels)):
      file_name = f"{split}.{field}.npy"
      path = os.path.join(dataset_dir, file_name)
      _atomic_write(path, lambda handle, a=array: np.save(handle, a, allow_pickle=False))
      arrays[field] = {"file": file_name, "dtype": str(array.dtype),
                       "shape": list(array.shape), "file_bytes": os.path.getsize(path),
                       "sha256": array_digest(array)}
    lengths = [int(n) for n in (shard_lengths or {}).get(split, [len(labels)])]
    if sum(lengths) != len(labels):
      raise ValueError(f"{spec.name} {split}: shard lengths {lengths} do not add up to "
                       f"its {len(labels)} examples")
    entries[split] = {"num_examples": int(len(labels)), "shard_lengths": lengths,
                      "arrays": arrays}
  manifest = {"format": FORMAT, "version": VERSION, "dataset": spec.name,
              "tfds_name": spec.tfds_name, "num_classes": spec.num_classes,
              "image_shape": list(spec.image_shape), **dict(source),
              "splits": entries}
  _write_json(manifest_path, manifest)
  kept = {record["file"] for entry in entries.values()
          for record in entry["arrays"].values()}
  for file_name in os.listdir(dataset_dir):  # arrays of splits no longer exported
    if file_name.endswith(".npy") and file_name not in kept:
      os.remove(os.path.join(dataset_dir, file_name))
  root = {"format": FORMAT, "version": VERSION, "datasets": datasets_in(cache_dir),
          "layout": "<dataset>/manifest.json, <dataset>/<split>.<image|label>.npy"}
  _write_json(os.path.join(cache_dir, ROOT_MANIFEST), root)
  return manifest


def _check_arrays(spec: DatasetSpec, split: str, images: np.ndarray,
                  labels: np.ndarray) -> None:
  if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape:
    raise ValueError(f"{spec.name} {split}: images must be uint8 (N, "
                     f"{', '.join(map(str, spec.image_shape))}), got {images.dtype} "
                     f"{images.shape}")
  if labels.dtype != np.int32 or labels.shape != (len(images),):
    raise ValueError(f"{spec.name} {split}: labels must be int32 ({len(images)},), got "
                     f"{labels.dtype} {labels.shape}")


def _write_json(path: str, value: Any) -> None:
  text = json.dumps(value, indent=2, sort_keys=True) + "\n"
  _atomic_write(path, lambda handle: handle.write(text.encode()))


def _atomic_write(path: str, write) -> None:
  """``write(binary handle)`` into a temporary file beside ``path``, then renames it."""
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with open(temporary, "wb") as handle:
      write(handle)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)

"""Weights between the reference MDEQ (PyTorch state-dict names) and jdeq's MDEQ.

Every jdeq variable of an MDEQ classifier (``nnx.Param`` and the BatchNorm
statistics) has one reference tensor, named as ``MDEQClsNet.state_dict()`` names it
(locuslab/deq, MDEQ-Vision ``lib/models/mdeq_core.py`` and ``mdeq.py``), in the
reference's layout: convolutions ``(O, I, H, W)`` (jdeq ``(H, W, I, O)``),
weight-norm gains ``(O, 1, 1, 1)`` (jdeq ``(O,)``), the classifier ``(out, in)``
(jdeq ``(in, out)``). :func:`reference_name` translates a jdeq path, and
:func:`load` / :func:`export` move whole weight sets either way, failing on any
tensor left unmatched or of the wrong shape.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

Path = tuple  # a jdeq variable path, e.g. ("deq", "cell", "blocks", 0, "conv1", "gain")

_NORM_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


class TransplantError(ValueError):
  """The two weight sets do not correspond."""


def reference_name(path: Path) -> tuple[str, str]:
  """``(state-dict name, layout)`` of the jdeq variable at ``path``.

  Layouts: ``"conv"``, ``"gain"``, ``"linear"`` and ``"vector"`` (as is).
  """
  p = list(path)
  leaf = p[-1]

  def norm(prefix: str) -> tuple[str, str]:
    return f"{prefix}.{_NORM_FIELDS[leaf]}", "vector"

  def conv(prefix: str) -> tuple[str, str]:
    return (f"{prefix}.weight", "conv") if leaf == "kernel" else (f"{prefix}.bias",
                                                                  "vector")

  def normed_conv(prefix: str) -> tuple[str, str]:
    return (f"{prefix}.weight_g", "gain") if leaf == "gain" else (f"{prefix}.weight_v",
                                                                  "conv")
  match p:
    case ["stem", "convs", k, _]:
      return conv(f"downsample.{3 * k}")
    case ["stem", "norms", k, _]:
      return norm(f"downsample.{3 * k + 1}")
    case ["stem", "injection_conv", _]:
      return conv("stage0.0")
    case ["stem", "injection_norm", _]:
      return norm("stage0.1")
    case ["deq", "cell", "blocks", i, name, *_] if name.startswith("conv"):
      return normed_conv(f"fullstage.branches.{i}.blocks.0.{name}")
    case ["deq", "cell", "blocks", i, name, _] if name.startswith("norm"):
      return norm(f"fullstage.branches.{i}.blocks.0.gn{name[4:]}")
    case ["deq", "cell", "fusion", "transforms", i, j, "conv", _]:
      return conv(f"fullstage.fuse_layers.{i}.{j}.net.conv")
    case ["deq", "cell", "fusion", "transforms", i, j, "norm", _]:
      return norm(f"fullstage.fuse_layers.{i}.{j}.net.gnorm")
    case ["deq", "cell", "fusion", "transforms", i, j, "convs", k, _]:
      return conv(f"fullstage.fuse_layers.{i}.{j}.net.{k}.conv")
    case ["deq", "cell", "fusion", "transforms", i, j, "norms", k, _]:
      return norm(f"fullstage.fuse_layers.{i}.{j}.net.{k}.gnorm")
    case ["deq", "cell", "post_convs", i, *_]:
      return normed_conv(f"fullstage.post_fuse_layers.{i}.conv")
    case ["deq", "cell", "post_norms", i, _]:
      return norm(f"fullstage.post_fuse_layers.{i}.gnorm")
    case ["head", "increase", i, "shortcut_conv", _]:
      return conv(f"incre_modules.{i}.0.downsample.0")
    case ["head", "increase", i, "shortcut_norm", _]:
      return norm(f"incre_modules.{i}.0.downsample.1")
    case ["head", "increase", i, name, _] if name.startswith("conv"):
      return conv(f"incre_modules.{i}.0.{name}")
    case ["head", "increase", i, name, _] if name.startswith("norm"):
      return norm(f"incre_modules.{i}.0.bn{name[4:]}")
    case ["head", "merge_convs", i, _]:
      return conv(f"downsamp_modules.{i}.0")
    case ["head", "merge_norms", i, _]:
      return norm(f"downsamp_modules.{i}.1")
    case ["head", "final_conv", _]:
      return conv("final_layer.0")
    case ["head", "final_norm", _]:
      return norm("final_layer.1")
    case ["head", "classifier", "kernel"]:
      return "classifier.weight", "linear"
    case ["head", "classifier", "bias"]:
      return "classifier.bias", "vector"
  raise TransplantError(f"no reference tensor for the jdeq variable {'/'.join(map(str, path))}")


def to_jdeq(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return array.transpose(2, 3, 1, 0)
  if layout == "gain":
    return array.reshape(array.shape[0])
  if layout == "linear":
    return array.T
  return array


def to_reference(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return array.transpose(3, 2, 0, 1)
  if layout == "gain":
    return array.reshape(array.shape[0], 1, 1, 1)
  if layout == "linear":
    return array.T
  return array


def _variables(model: nnx.Module) -> dict[Path, np.ndarray]:
  """The model's arrays (parameters and batch statistics), RNG state left out."""
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
  return {path: np.asarray(value) for path, value in flat.items()}


def export(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's weights as a reference state dict (numpy, reference layout)."""
  return export_arrays(_variables(model))


def export_arrays(arrays: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
  """jdeq arrays by variable path (weights, or their gradients) in reference form."""
  out = {}
  for path, value in arrays.items():
    name, layout = reference_name(path)
    out[name] = to_reference(np.asarray(value), layout)
  return out


def load(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
  """Overwrites ``model``'s weights with the reference's ``tensors`` (in place).

  Raises:
    TransplantError: if a jdeq variable has no tensor or a tensor of another
      shape, or if a reference tensor is left over.
  """
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  pure = nnx.to_pure_dict(state)
  flat = nnx.traversals.flatten_mapping(pure)
  used = set()
  for path, value in flat.items():
    name, layout = reference_name(path)
    if name not in tensors:
      raise TransplantError(f"the reference weights have no {name!r} (for jdeq's "
                            f"{'/'.join(map(str, path))})")
    array = to_jdeq(np.asarray(tensors[name]), layout)
    if array.shape != np.shape(value):
      raise TransplantError(f"{name}: the reference's shape {np.shape(tensors[name])} "
                            f"does not fit jdeq's {np.shape(value)}")
    flat[path] = np.asarray(array, dtype=np.asarray(value).dtype)
    used.add(name)
  left = sorted(set(tensors) - used)
  if left:
    raise TransplantError(f"reference tensors without a jdeq variable: {left[:5]}"
                          f"{' …' if len(left) > 5 else ''}")
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(flat))
  nnx.update(model, state)

"""Prints a model's parameter count by part (stem, equilibrium cell, head).

  python -m experiments.param_count --config mdeq_cifar_tiny
  python -m experiments.param_count --all

Shapes come from ``nnx.eval_shape``, so no weights are allocated. Models name
their parts ``stem`` / ``deq`` / ``head`` (other top-level submodules are listed by
their own names); the reference count, when registered, is printed alongside.
"""

from __future__ import annotations

import argparse

from flax import nnx

from jdeq import models, nn

PART_LABELS = {"stem": "stem", "deq": "equilibrium cell", "head": "head",
               "vocab": "embedding/softmax"}


def count_by_part(name: str) -> dict[str, int]:
  """Parameter counts of configuration ``name`` keyed by top-level submodule."""
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  return {str(part): nn.num_params(params[part]) for part in params}


def describe(name: str) -> str:
  counts = count_by_part(name)
  total = sum(counts.values())
  lines = [name]
  order = list(PART_LABELS) + [p for p in counts if p not in PART_LABELS]
  for part in (p for p in order if p in counts):
    count = counts[part]
    lines.append(f"  {PART_LABELS.get(part, part):<17}{count:>12,d}")
  lines.append(f"  {'total':<17}{total:>12,d}")
  ref = models.reference(name)
  if ref is not None:
    lines.append(f"  {'reference':<17}{ref.params:>12,d}  ({100 * (total / ref.params - 1):+.2f}%;"
                 f" {ref.source})")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--config", help=f"one of {models.list_configs()}")
  group.add_argument("--all", action="store_true", help="every registered configuration")
  args = parser.parse_args(argv)
  if args.config is not None and args.config not in models.list_configs():
    parser.error(f"unknown configuration {args.config!r}; valid: {models.list_configs()}")
  names = models.list_configs() if args.all else [args.config]
  print("\n\n".join(describe(name) for name in names))


if __name__ == "__main__":
  main()

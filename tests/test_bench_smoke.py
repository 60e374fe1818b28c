"""Smoke test of the benchmarks: the jdeq side runs and reports what it promises.

Tiny repetition counts and no timing assertions: this checks that the benchmark
code works against the current library and that its output has the documented
structure, not how fast anything is.
"""

import os
import subprocess
import sys

import jax
import pytest

from experiments.bench import jdeq_side, report, run, timing, workloads


def _is_positive_timing(figures):
  return (figures["count"] >= 1 and figures["median"] > 0
          and figures["p25"] <= figures["median"] <= figures["p75"])


def test_w1_cell_jdeq_side_and_table(tmp_path):
  cell = run.measure_cell("w1", "fixed_point_iteration/ift", None, reps=1, rounds=1, warmup=1)
  jdeq_figures = cell["jdeq"]
  assert set(jdeq_figures["timings"]) == {"step", "forward", "backward", "bare"}
  assert all(_is_positive_timing(t) for t in jdeq_figures["timings"].values())
  assert jdeq_figures["counts"]["forward_evaluations"] == workloads.W1.forward_iters
  assert jdeq_figures["counts"]["backward_vjps"] == workloads.W1.backward_iters
  assert jdeq_figures["counts"]["diverged"] == 0
  assert jdeq_figures["compile"]["temp_bytes"] > 0
  assert jdeq_figures["overhead"] > 0
  assert cell["bare_counts"] == {"evaluations": 31, "vjps": 31}
  assert "torch" not in cell

  results = {"device": "cpu", "load": {"load1": 0.0, "cores": 2}, "cells": [cell],
             "memory": [], "conditions": {"threads": 2, "xla_flags": "--flag"}}
  table = report.markdown_table(results)
  assert "| w1 | fixed_point_iteration/ift |" in table
  assert "Threads per side: 2" in table and "`--flag`" in table

  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
  assert report.write_table(table, str(readme), str(tmp_path / "t.md")) == str(readme)
  text = readme.read_text()
  assert "old" not in text and "| w1 | fixed_point_iteration/ift |" in text and text.endswith("rest\n")
  no_markers = tmp_path / "OTHER.md"
  no_markers.write_text("no markers\n")
  fallback = tmp_path / "table.md"
  assert report.write_table(table, str(no_markers), str(fallback)) == str(fallback)
  assert no_markers.read_text() == "no markers\n"


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown variant"):
    workloads.split_variant("anderson/backprop")
  with pytest.raises(ValueError, match="unknown workload"):
    workloads.workload("w9")


def test_w3_cell_is_mdeq_tiny_with_the_reference_parameter_count():
  cell = jdeq_side.build_cell("w3")
  assert jdeq_side.parameter_count(cell) == workloads.W3_PARAMS
  images = cell.batch["x"]
  assert images.shape == (workloads.W3.batch, 32, 32, 3)
  (map_args, z0) = jax.eval_shape(cell.prepare, cell.params, images)
  state = jax.eval_shape(cell.map, z0, *map_args)
  assert [s.shape for s in state] == [(64, 32, 32, 24), (64, 16, 16, 24)]
  logits = jax.eval_shape(cell.logits, cell.params, state)
  assert logits.shape == (workloads.W3.batch, workloads.NUM_CLASSES)


def test_thread_pinning_keeps_all_cores_by_default():
  assert timing.pin_threads(0) == len(os.sched_getaffinity(0))


def test_torch_worker_modules_import_without_jax():
  # The TorchDEQ worker runs in an environment without JAX: the modules it imports
  # (torch_side itself also needs torch, which is not in this environment) and the
  # packages above them must not import JAX.
  code = ("import sys; import experiments.bench.timing, experiments.bench.workloads; "
          "leaked = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jdeq'}); "
          "sys.exit(f'imported {leaked}' if leaked else 0)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=root))
  assert result.returncode == 0, result.stderr

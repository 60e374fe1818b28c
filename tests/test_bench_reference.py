"""Benchmark workload w3ref: jdeq's MDEQ-Tiny training steps beside the authors' code.

Everything but the reference side itself is checked here without torch: the
workload is opt-in, the command line, the messages that say what a skipped w3ref
needs, the jdeq steps (traced, not run), and the report from a made-up cell. The
test that runs the authors' code needs ``JDEQ_REFERENCE_DIR`` (a locuslab/deq
checkout) and ``JDEQ_TORCH_PYTHON`` (a Python with torch and the reference's
imports), as the reference-parity test does.
"""

import json
import os
import pathlib
import stat
import subprocess
import sys

import jax
import pytest

from experiments.bench import jdeq_side, report, run, workloads

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _timing(median):
  return {"median": median, "p25": 0.9 * median, "p75": 1.1 * median,
          "round_medians": [median], "count": 1}


def _reference_cell(kind, jdeq_s, reference_s):
  """A w3ref cell as :func:`run.measure_reference_cell` returns it."""
  equilibrium = kind == "equilibrium"
  counts = dict(forward_evaluations=19 if equilibrium else 10,
                backward_vjps=21 if equilibrium else None,
                forward_rel_residual=0.12 if equilibrium else None,
                backward_residual=0.2 if equilibrium else None)
  return {"workload": "w3ref", "variant": kind, "parameters": workloads.W3_PARAMS,
          "reference_parameters": workloads.W3_PARAMS, "reps": 1, "rounds": 3,
          "jdeq": {"timings": {"step": _timing(jdeq_s)},
                   "compile": {"compile_s": 20.0, "temp_bytes": 2**30},
                   "counts": counts},
          "reference": {"timings": {"step": _timing(reference_s)},
                        "counts": dict(counts, map_calls=20 if equilibrium else 10)},
          "ratio": {"step": reference_s / jdeq_s}}


def _torch_cell():
  """A minimal W1 cell of the TorchDEQ comparison."""
  return {"workload": "w1", "variant": "anderson/ift", "reps": 20, "rounds": 3,
          "jdeq": {"timings": {name: _timing(1e-3) for name in ("step", "forward",
                                                                 "backward")},
                   "overhead": 1.5,
                   "compile": {"compile_s": 1.0, "temp_bytes": 2**20},
                   "counts": {"forward_evaluations": 30, "backward_vjps": 30,
                              "forward_rel_residual": 1e-3}},
          "torch": {"timings": {name: _timing(2e-3) for name in ("step", "forward",
                                                                  "backward")},
                    "overhead": 2.0,
                    "counts": {"forward_rel_residual": 1e-3}},
          "speedup": {"step": 2.0, "forward": 2.0, "backward": 2.0}}


def _results(cells):
  return {"device": "cpu", "load": {"load1": 0.0, "cores": 2}, "cells": cells,
          "memory": [], "conditions": {"threads": 2, "xla_flags": ""},
          "reference_device": "cpu (x86_64), torch 2.13.0, 2 threads"}


def test_w3ref_is_an_opt_in_workload_of_two_steps():
  assert "w3ref" not in workloads.DEFAULT_WORKLOADS
  assert workloads.workload("w3ref") is workloads.W3REF
  assert workloads.REFERENCE_KINDS == ("equilibrium", "unrolled")
  assert (workloads.W3REF.batch, workloads.W3REF.forward_iters,
          workloads.W3REF.backward_iters) == (64, 18, 20)


def test_command_line():
  args = run.parse_args(["--workloads", "w3ref", "--reference-dir", "deq",
                         "--reference-python", "py"])
  assert (args.workloads, args.reference_dir, args.reference_python) == (
      "w3ref", "deq", "py")
  defaults = run.parse_args([])
  assert defaults.reference_dir is None and defaults.reference_python is None
  assert "w3ref" not in defaults.workloads.split(",")


def _fake_checkout(root):
  models = root / "deq" / "MDEQ-Vision" / "lib" / "models"
  models.mkdir(parents=True)
  (models / "mdeq.py").write_text("")
  return str(root / "deq")


def test_reference_problems_say_what_w3ref_needs(tmp_path):
  missing = run.reference_problem(sys.executable, None)
  assert "--reference-dir" in missing and "locuslab/deq" in missing
  assert "yacs" in missing and "--reference-python" in missing

  assert "MDEQ-Vision/lib/models/mdeq.py" in run.reference_problem(
      sys.executable, str(tmp_path))

  checkout = _fake_checkout(tmp_path)
  assert "no reference interpreter" in run.reference_problem(
      str(tmp_path / "no-python"), checkout)
  # An interpreter that lacks the reference's imports, whatever this machine has.
  broken = tmp_path / "python"
  broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'yacs'\" >&2\n"
                    "exit 1\n")
  broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
  problem = run.reference_problem(str(broken), checkout)
  assert "cannot import torch, yacs, termcolor, scipy" in problem
  assert "No module named 'yacs'" in problem


def test_without_reference_dir_w3ref_is_skipped_with_a_message(tmp_path):
  out = tmp_path / "out"
  finished = subprocess.run(
      [sys.executable, "-m", "experiments.bench", "--workloads", "w3ref", "--no-memory",
       "--out", str(out), "--readme", ""],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert finished.returncode == 0, finished.stderr
  assert "skipping w3ref" in finished.stdout and "--reference-dir" in finished.stdout
  assert "nothing was measured" in finished.stdout
  results = json.loads((out / "results.json").read_text())
  assert results["cells"] == [] and "--reference-dir" in results["skipped"]["w3ref"]
  assert not (out / "table.md").exists()  # no empty table replaces the last one


def test_report_rows_label_the_reference_and_give_its_ratio(tmp_path):
  cells = [_torch_cell(), _reference_cell("equilibrium", 10.0, 20.0),
           _reference_cell("unrolled", 4.0, 6.0)]
  table = report.markdown_table(_results(cells))
  torch_part, reference_part = table.split("jdeq vs the authors' code")
  assert "| w1 | anderson/ift |" in torch_part and "| w3ref" not in torch_part
  assert "| step | jdeq ms (p25–p75) | reference ms (p25–p75) | reference / jdeq |" in (
      reference_part)
  assert "TorchDEQ" not in reference_part
  rows = [line for line in reference_part.splitlines() if line.startswith("| ")][1:]
  assert rows[0].startswith("| equilibrium | 1e+04 (9e+03–1.1e+04) | 2e+04 ")
  assert "| 2.00× | 19/21 | 19/21 | 1.2e-01 / 1.2e-01 | 158,890 / 158,890 |" in rows[0]
  assert rows[1].startswith("| unrolled |")
  assert "| 1.50× | 10/– | 10/– | – / – |" in rows[1]

  only_reference = report.readme_section(_results(cells[1:]))
  assert "solver × gradient" not in only_reference  # no TorchDEQ paragraph
  assert "--workloads w3ref --reference-dir DEQ" in only_reference
  assert "| workload | variant |" not in only_reference
  assert "torch 2.13.0" in only_reference

  charts = report.plot(_results(cells), str(tmp_path))
  assert str(tmp_path / "w3ref_times.png") in charts


def test_progress_line_gives_both_sides_and_their_nfe():
  line = run.reference_line(_reference_cell("unrolled", 4.0, 6.0), 12.0)
  assert "jdeq step    4000.0 ms" in line and "reference step    6000.0 ms" in line
  assert "reference/jdeq 1.50" in line and "jdeq 10/–, reference 10/–" in line


def test_jdeq_steps_are_the_loops_steps_of_mdeq_tiny():
  with pytest.raises(ValueError, match="unknown step kind"):
    jdeq_side.training_step("phantom")
  built = jdeq_side.training_step("equilibrium")
  assert built.parameter_count() == workloads.W3_PARAMS
  assert built.batch["image"].shape == (64, 32, 32, 3)
  # Traced only (compiling MDEQ-Tiny takes tens of seconds on a small CPU).
  state, metrics = jax.eval_shape(built.step, built.state, built.batch)
  assert metrics.loss.shape == () and metrics.fwd_nfe.shape == ()
  forward, backward = jax.eval_shape(built.solves, built.state, built.batch)
  assert forward.nstep.shape == backward.nstep.shape == (64,)
  assert jdeq_side.training_step("unrolled").solves is None


@pytest.mark.skipif(not os.environ.get("JDEQ_REFERENCE_DIR")
                    or not os.environ.get("JDEQ_TORCH_PYTHON"),
                    reason="needs JDEQ_REFERENCE_DIR (a locuslab/deq checkout) and "
                           "JDEQ_TORCH_PYTHON (a Python with torch and the reference's "
                           "imports)")
def test_unrolled_cell_runs_the_authors_code():
  python, reference_dir = os.environ["JDEQ_TORCH_PYTHON"], os.environ["JDEQ_REFERENCE_DIR"]
  assert run.reference_problem(python, reference_dir) is None
  worker = run.TorchWorker(python, threads=0, retain_memory=True,
                           module=run.REFERENCE_SIDE_MODULE, label="reference")
  try:
    assert "torch" in worker.request(cmd="info")["device"]
    cell = run.measure_reference_cell("unrolled", worker, os.path.abspath(reference_dir),
                                      reps=1, rounds=1, warmup=0)
  finally:
    worker.close()
  assert cell["parameters"] == cell["reference_parameters"] == workloads.W3_PARAMS
  assert cell["jdeq"]["counts"]["forward_evaluations"] == 10
  assert cell["reference"]["counts"]["forward_evaluations"] == 10
  assert cell["reference"]["counts"]["backward_vjps"] is None
  assert cell["ratio"]["step"] > 0

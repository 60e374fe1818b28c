"""The time-to-tolerance benchmark: its workload, its figures and its PyTorch side.

The workload tests check the property the benchmark exists for (samples that need
very different numbers of map evaluations, stopped one by one by jdeq); the table
tests build results by hand so that every figure has a known value; the PyTorch
side runs only where its interpreter exists (``$JDEQ_BENCH_TORCH_PYTHON`` or
``.venv-bench``), the authors' Broyden only with ``$JDEQ_BENCH_REFERENCE_DIR``.
"""

import ast
import json
import os
import sys

import numpy as np
import pytest

from experiments.bench import run, tolerance

TORCH_PYTHON = run.default_torch_python()
TORCH_PROBLEM = run.torch_side_problem(TORCH_PYTHON)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def arrays():
  return tolerance.tolerance_arrays()


@pytest.fixture(scope="module")
def fixed_point_solve(arrays):
  """jdeq's per-sample fixed-point solve to 1e-3 and its figures (compiled once)."""
  solver = tolerance.jdeq_solver("fixed_point_iteration", 1e-3, tolerance.BUDGET)
  compiled, args, _ = tolerance.compile_solve(arrays, solver)
  z, stats = compiled(*args)
  return tolerance.jdeq_figures(arrays, z, stats, 1e-3, per_sample=True)


def test_workload_arrays_are_the_documented_contraction(arrays):
  w, scale = arrays["W"], arrays["scale"]
  assert w.shape == (tolerance.DIM, tolerance.DIM) and arrays["x"].shape == (
      tolerance.BATCH, tolerance.DIM)
  np.testing.assert_allclose(w @ w.T, np.eye(tolerance.DIM), atol=1e-5)  # orthogonal
  np.testing.assert_allclose(scale[[0, -1]], [tolerance.SCALE_MIN, tolerance.SCALE_MAX],
                             rtol=1e-6)
  assert np.all(np.diff(scale) > 0)
  gaps = 1 - scale.astype(np.float64)
  np.testing.assert_allclose(gaps[1:] / gaps[:-1], gaps[1] / gaps[0], rtol=1e-4)
  again = tolerance.tolerance_arrays()
  assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
  assert not np.array_equal(tolerance.tolerance_arrays(seed=1)["W"], w)


def test_samples_need_widely_different_nfe_and_stop_one_by_one(arrays, fixed_point_solve):
  nfe = np.asarray(fixed_point_solve["nfe"])
  assert nfe.min() <= 10 and nfe.max() >= 60, (nfe.min(), nfe.max())
  assert len(np.unique(nfe)) >= 20  # per-sample counts, not one batch count
  assert fixed_point_solve["batched_evaluations"] == nfe.max()
  # The slower the contraction (larger s_i), the more evaluations.
  ranks = np.argsort(np.argsort(nfe))
  assert np.corrcoef(ranks, np.arange(nfe.size))[0, 1] > 0.9
  residual = np.asarray(fixed_point_solve["rel_residual"])
  assert np.all(residual <= 1e-3 * 1.01) and np.all(fixed_point_solve["reported_converged"])
  # A sample stopped at its first hit: its residual is near the tolerance, not far below.
  assert np.median(residual) > 1e-4
  assert fixed_point_solve["hit_nfe"] == fixed_point_solve["nfe"]

  solver = tolerance.jdeq_solver("anderson", 1e-3, tolerance.BUDGET)
  compiled, args, _ = tolerance.compile_solve(arrays, solver)
  z, stats = compiled(*args)
  anderson = np.asarray(stats.nstep)
  assert anderson.min() <= 12 and anderson.max() >= 50 and len(np.unique(anderson)) >= 15
  assert np.all(tolerance.relative_residuals(arrays, np.asarray(z)) <= 1e-3 * 1.01)


def test_all_to_k_runs_every_sample_to_the_traced_budget(arrays, fixed_point_solve):
  k = fixed_point_solve["batched_evaluations"]
  solver = tolerance.jdeq_solver("fixed_point_iteration", 1e-30, tolerance.BUDGET)
  compiled, args, _ = tolerance.compile_solve(arrays, solver, traced_budget=True)
  for budget in (k, 20):
    z, stats = compiled(*args[:-1], np.int32(budget))
    assert np.all(np.asarray(stats.nstep) == budget)
  figures = tolerance.jdeq_figures(arrays, *compiled(*args[:-1], np.int32(k)), 1e-3,
                                   per_sample=False)
  assert figures["hit_nfe"] is None and figures["batched_evaluations"] == k
  # Same iterates up to each first hit, then more: every sample ends at or below the
  # residual it stopped at.
  assert np.all(np.asarray(figures["rel_residual"])
                <= np.asarray(fixed_point_solve["rel_residual"]) * 1.001)


def _timing(median, spread=0.05):
  return {"median": median, "p25": median * (1 - spread), "p75": median * (1 + spread),
          "round_medians": [median], "count": 3}


def _side(nfe, hits, residual, median, batched=None):
  side = {"batched_evaluations": batched or max(nfe), "nfe": nfe, "hit_nfe": hits,
          "rel_residual": residual, "timing": _timing(median)}
  side["summary"] = tolerance.summarize(side, 1e-3)
  return side


def _fake_results(all_k_median=0.0101):
  sides = {
      "jdeq": _side([2, 4], [2, 4], [9e-4, 1.0005e-3], 0.010),
      "jdeq_all_k": _side([4, 4], [2, 4], [1e-6, 9e-4], all_k_median),
      "torchdeq": _side([6, 6], [3, 6], [1e-7, 5e-4], 0.100),
      "reference": _side([5, 5], None, [2e-3, 1e-4], 0.050),
  }
  return {"device": "cpu (jax x)", "torch_device": "cpu, torch y", "reps": 2, "rounds": 3,
          "load": {"load1": 0.5, "cores": 2}, "conditions": {"threads": 1},
          "skipped": {"torchdeq": None, "reference": None},
          "workload": {"title": "fake", "batch": 2, "dim": 3, "budget": 300},
          "cells": [{"solver": "anderson", "tol": 1e-3, "sides": sides}]}


def test_summary_figures():
  results = _fake_results()
  sides = results["cells"][0]["sides"]
  jd = sides["jdeq"]["summary"]
  assert jd["needed_share"] == pytest.approx((2 + 4) / (2 * 4))
  assert (jd["nfe_min"], jd["nfe_max"], jd["nfe_median"]) == (2, 4, 3.0)
  assert jd["converged_share"] == 1.0  # 1.0005e-3 is within the float32 slack
  assert jd["ms_per_batched_evaluation"] == pytest.approx(10.0 / 4)
  assert sides["torchdeq"]["summary"]["needed_share"] == pytest.approx((3 + 6) / 12)
  assert sides["reference"]["summary"]["needed_share"] is None
  assert sides["reference"]["summary"]["converged_share"] == 0.5
  unreached = _side([4, 4], [None, 2], [2e-3, 1e-4], 0.01)["summary"]
  assert unreached["needed_share"] == pytest.approx((4 + 2) / 8)
  assert unreached["converged_share"] == 0.5


def test_table_findings_and_readme(tmp_path):
  results = _fake_results()
  table = tolerance.markdown_table(results)
  assert "| anderson | 0.001 | jdeq | 10 (9.5–10.5) | 4 | 2.5 | 3 (2–4) | 0.75 |" in table
  assert "| anderson | 0.001 | reference | 50 (47.5–52.5) | 5 | 10 | 5 (5–5) | – |" in table
  assert "| anderson | 0.001 | TorchDEQ |" in table and "jdeq, all to K" in table
  assert "per-sample stopping saved no wall time" in table
  assert "batch-wide stopping is as fast here" in table
  assert "up to 50% of the samples end above the tolerance" in table
  assert "anderson at 0.001: 6 vs 4" in table  # TorchDEQ's longer loop is explained
  json.dumps(results)  # the results are plain JSON

  faster = tolerance.markdown_table(_fake_results(all_k_median=0.020))
  assert "per-sample stopping was faster" in faster
  assert "batch-wide stopping is as fast here" not in faster

  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{tolerance.README_START}\nold\n{tolerance.README_END}\nrest\n")
  assert tolerance.write_readme(table, str(readme))
  text = readme.read_text()
  assert "old" not in text and table in text and text.endswith("rest\n")
  other = tmp_path / "OTHER.md"
  other.write_text("<!-- bench:start -->\nx\n<!-- bench:end -->\n")
  assert not tolerance.write_readme(table, str(other))
  assert "x" in other.read_text() and table not in other.read_text()
  assert not tolerance.write_readme(table, "")

  chart = tolerance.plot_nfe(results, str(tmp_path / "nfe.png"))
  assert os.path.getsize(chart) > 1000


def test_main_writes_table_json_chart_and_readme(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"{tolerance.README_START}\n{tolerance.README_END}\n")
  assert tolerance.main(["--no-torch", "--solvers", "fixed_point_iteration", "--tols",
                         "1e-3", "--reps", "1", "--rounds", "1", "--warmup", "0",
                         "--threads", "0", "--out", str(tmp_path),
                         "--readme", str(readme)]) == 0
  results = json.loads((tmp_path / "tolerance.json").read_text())
  assert [c["solver"] for c in results["cells"]] == ["fixed_point_iteration"]
  assert set(results["cells"][0]["sides"]) == {"jdeq", "jdeq_all_k"}
  assert results["skipped"]["torchdeq"] == "--no-torch"
  assert "--reference-dir" in results["skipped"]["reference"]
  table = (tmp_path / "tolerance.md").read_text()
  assert "| fixed_point_iteration | 0.001 | jdeq |" in table and table in readme.read_text()
  assert (tmp_path / "tolerance_nfe.png").exists()


def test_reference_root_accepts_the_checkout_layouts(tmp_path):
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "solvers.py").write_text("")
  (tmp_path / "MDEQ-Vision").mkdir()
  for given in (tmp_path, tmp_path / "MDEQ-Vision", tmp_path / "lib"):
    assert tolerance.reference_root(str(given)) == str(tmp_path)
  with pytest.raises(ValueError, match="--reference-dir"):
    tolerance.reference_root(str(tmp_path / "MDEQ-Vision" / "nothing"))


def test_pytorch_worker_imports_no_jax():
  # The worker runs in an environment without JAX; only these may be imported.
  path = os.path.join(REPO_ROOT, "experiments", "bench", "torch_tolerance.py")
  tree = ast.parse(open(path).read())
  names = {alias.name.split(".")[0] for node in ast.walk(tree)
           if isinstance(node, ast.Import) for alias in node.names}
  names |= {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module}
  allowed = {"__future__", "argparse", "importlib", "json", "platform", "sys", "time",
             "typing", "numpy", "torch", "torchdeq", "experiments"}
  assert names <= allowed, names - allowed
  # Of jdeq's own modules, only the standard-library protocol module.
  own = {node.module for node in ast.walk(tree)
         if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments")}
  assert own <= {"experiments.bench"}, own


def _worker(side, python, arrays, tmp_path, root=None):
  path = str(tmp_path / "arrays.npz")
  np.savez(path, **arrays)
  worker = tolerance.start_worker(python, side, threads=1, reference_root=root)
  worker.request(cmd="load", arrays=path)
  return worker


@pytest.mark.skipif(TORCH_PROBLEM is not None, reason=str(TORCH_PROBLEM))
def test_torchdeq_side_stops_batch_wide_on_the_same_iterates(arrays, fixed_point_solve,
                                                             tmp_path):
  worker = _worker("torchdeq", TORCH_PYTHON, arrays, tmp_path)
  try:
    worker.request(cmd="setup", solver="fixed_point_iteration", tol=1e-3,
                   budget=tolerance.BUDGET, warmup=0)
    assert len(worker.request(cmd="time", reps=2)["seconds"]) == 2
    side = tolerance.worker_figures(arrays, worker.request(cmd="stats"))
  finally:
    worker.close()
  hits = np.asarray(side["hit_nfe"])
  # Batch-wide: the loop ends with the last sample to meet the tolerance, and every
  # sample gets that count.
  assert side["batched_evaluations"] == hits.max()
  assert set(side["nfe"]) == {side["batched_evaluations"]}
  assert np.all(np.asarray(side["rel_residual"]) < 1e-3)
  # Plain iteration is the same recursion on both sides: each sample first meets the
  # tolerance at (nearly) the evaluation where jdeq stopped it.
  jdeq_nfe = np.asarray(fixed_point_solve["nfe"])
  assert np.mean(np.abs(hits - jdeq_nfe) <= 1) >= 0.95


@pytest.mark.skipif(not os.environ.get("JDEQ_BENCH_REFERENCE_DIR"),
                    reason="set JDEQ_BENCH_REFERENCE_DIR to a checkout of locuslab/deq "
                           "(and JDEQ_BENCH_REFERENCE_PYTHON to a PyTorch interpreter "
                           "with scipy and termcolor) to run the reference side")
def test_reference_side_stops_on_the_whole_batch(arrays, tmp_path):
  python = os.environ.get("JDEQ_BENCH_REFERENCE_PYTHON", TORCH_PYTHON)
  root = tolerance.reference_root(os.environ["JDEQ_BENCH_REFERENCE_DIR"])
  worker = _worker("reference", python, arrays, tmp_path, root)
  try:
    worker.request(cmd="setup", solver="broyden", tol=1e-3, budget=100, warmup=0)
    reply = worker.request(cmd="stats")
  finally:
    worker.close()
  assert 1 < reply["evaluations"] <= 101 and reply["batch_rel_residual"] < 1e-3
  # One residual for the whole batch, ‖F − Z‖_F / ‖F‖_F: it meets the tolerance,
  # recomputed in float64 from the returned states.
  z = np.asarray(reply["z"], np.float64)
  w, u_mat, x, scale = (arrays[k].astype(np.float64) for k in ("W", "U", "x", "scale"))
  fz = np.tanh(scale[:, None] * (z @ w.T) + x @ u_mat.T)
  assert np.linalg.norm(fz - z) / np.linalg.norm(fz) < 1e-3 * 1.01


def test_a_worker_that_cannot_start_is_an_error_naming_its_side(arrays, tmp_path):
  # This interpreter has no torch: the worker dies on import, and the driver says so
  # instead of waiting for a reply.
  with pytest.raises(RuntimeError, match="torchdeq worker exited"):
    _worker("torchdeq", sys.executable, arrays, tmp_path)

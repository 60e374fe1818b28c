"""``python -m experiments.device_check --quick`` runs every part on this machine and
reports what it promises; a failing part is recorded without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from experiments.device_check import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["devices", "tests", "throughput_ift", "throughput_unrolled", "bench_w1",
         "bench_w2"]


def test_quick_check_passes_and_writes_its_report(tmp_path):
  out = tmp_path / "check"
  finished = subprocess.run(
      [sys.executable, "-m", "experiments.device_check", "--quick", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=400,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  result = json.loads((out / "device_check.json").read_text())
  assert result["passed"] and result["quick"]
  assert [p["name"] for p in result["parts"]] == PARTS
  assert all(p["status"] == "passed" and p["error"] is None for p in result["parts"])
  figures = {p["name"]: p["figures"] for p in result["parts"]}

  import jax  # the suite's own platform: the check must have found the same
  assert result["platform"] == jax.devices()[0].platform
  assert result["devices"] and {"id", "platform", "device_kind"} <= set(result["devices"][0])
  assert result["versions"]["python"] and result["versions"]["jax"] == jax.__version__

  tests = figures["tests"]
  assert tests["platform"] == result["platform"] and tests["failures"] == 0
  assert tests["passed"] == tests["tests"] - tests["skipped"] > 0

  for mode in ("ift", "unrolled"):
    runs = figures[f"throughput_{mode}"]["runs"]
    assert [r["batch"] for r in runs] == list(run.settings_for(True).batches)
    for r in runs:
      assert r["mode"] == mode and r["compile_s"] > 0 and r["nonfinite"] == 0
      assert len(r["step_times_s"]) == 2 and min(r["step_times_s"]) <= r["step_s"]
      assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
      assert r["temp_bytes"] > 0
      if result["platform"] == "cpu":
        assert r["peak_bytes_in_use"] is None  # XLA:CPU keeps no allocator statistics

  for workload in ("w1", "w2"):
    bench = figures[f"bench_{workload}"]
    assert [(c["workload"], c["variant"]) for c in bench["cells"]] == [(workload,
                                                                         "anderson/ift")]
    assert bench["cells"][0]["jdeq_step_ms"] > 0 and bench["cells"][0]["diverged"] == 0
    assert (out / f"bench_{workload}" / "results.json").exists()
  torch_side = result["torch_side"]
  assert (bench["torch_side"] == "jdeq alone") == (not torch_side["use"])

  report = (out / "device_check.md").read_text()
  for heading in ("## Devices", "## Tests on the device", "## MDEQ-Tiny training",
                  "## Benchmark", "## Compile times"):
    assert heading in report
  assert "**passed**" in report and "## Failures" not in report


def test_a_failing_part_is_recorded_and_a_late_one_skipped():
  settings = run.settings_for(True, budget_s=100.0)

  def broken(timeout):
    raise run.PartFailure("the device fell over")

  deadline = time.perf_counter() + 100.0
  failed = run.run_part("tests", broken, settings, deadline)
  assert failed["status"] == "failed" and "fell over" in failed["error"]
  crashed = run.run_part("tests", lambda t: 1 / 0, settings, deadline)
  assert crashed["status"] == "failed" and "ZeroDivisionError" in crashed["error"]
  late = run.run_part("tests", lambda t: {}, settings, time.perf_counter() + 1.0)
  assert late["status"] == "skipped"
  ok = run.run_part("tests", lambda t: {"timeout": t}, settings, deadline)
  assert ok["status"] == "passed" and 0 < ok["figures"]["timeout"] <= 100.0

  result = {"passed": False, "quick": True, "platform": "cpu", "wall_s": 1.0,
            "devices": [], "versions": {"python": "3"},
            "torch_side": {"reason": "none"}, "parts": [failed, late, ok]}
  report = run.markdown(result)
  assert "**FAILED**" in report and "the device fell over" in report


def test_settings_are_validated():
  with pytest.raises(ValueError, match="test_workers"):
    run.CheckSettings(test_workers=-1)
  with pytest.raises(ValueError, match="unknown option"):
    run.CheckSettings(batch=3)
  from experiments.device_check import throughput
  with pytest.raises(ValueError, match="mode"):
    throughput.ThroughputSettings(mode="backprop")
  with pytest.raises(ValueError, match="batches"):
    throughput.ThroughputSettings(batches=(0,))

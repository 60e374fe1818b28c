"""The device check: jdeq's tests, benchmark and MDEQ training on the default JAX device.

``python -m experiments.device_check --out DIR [--quick] [--budget-s S]`` runs, each
part in processes of its own and on whatever device JAX picks (a GPU where one is
installed, else the CPU):

1. ``devices``: ``jax.devices()`` (platform, kind, allocator limit where reported)
   and the versions of python, jax, jaxlib, flax, optax, orbax, chex, numpy and, when
   installed, torch, torchdeq, jaxopt, tensorflow and tensorboardX.
2. ``tests``: pytest on the core and convolution-derivative tests
   (:data:`FULL_TESTS`), with ``JDEQ_TEST_PLATFORM`` set to the device's platform so
   that ``tests/conftest.py`` runs them there; pass/fail/skip counts from JUnit XML.
3. ``throughput_ift`` and ``throughput_unrolled``: MDEQ-Tiny training steps on
   random CIFAR-shaped data at batch 64 and 256 (:mod:`.throughput`): compile time,
   first step, median step, images/s, peak device memory.
4. ``bench_w1``, ``bench_w2``, ``bench_w3``: ``python -m experiments.bench`` for one
   workload each, with its default variants and repetitions, on the same device;
   the TorchDEQ side runs too when an interpreter with torch and torchdeq is found
   (``$JDEQ_BENCH_TORCH_PYTHON``, ``.venv-bench/bin/python``, this interpreter), on
   CUDA when the device is a GPU (``JDEQ_BENCH_TORCH_DEVICE=cuda``) and only if
   torch sees one: a GPU against a CPU would be no comparison.

``--quick`` runs the same code paths in a few minutes on a CPU: a subset of the
tests (:data:`QUICK_TESTS`, :data:`QUICK_TEST_FILTER`), batch 8 with 2 timed
steps and 4-evaluation solves (each batch size compiles anew: tens of seconds per
MDEQ step on a CPU), and W1 and W2 with one variant, one repetition and no
memory scaling (W3's MDEQ step is the throughput part's model).

Each part is independent: one that fails or runs out of time is recorded with its
error and the others still run. ``--budget-s`` bounds the whole check; a part that
would start past it is recorded as skipped. The exit code is 0 only when every part
passed. Outputs: ``DIR/device_check.json`` (everything), ``DIR/device_check.md``
(the same as tables) and, per part, its raw files (``DIR/tests.xml``,
``DIR/bench_w1/results.json``, ...).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform as platform_lib
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable, Optional, Sequence

from jdeq import config, require, require_positive

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL_TESTS = ("tests/test_solvers.py", "tests/test_gradients.py", "tests/test_ops_conv.py",
              "tests/test_ops_conv_paths.py", "tests/test_nn_layer.py")
QUICK_TESTS = ("tests/test_solvers.py", "tests/test_ops_conv_paths.py")
QUICK_TEST_FILTER = ("converges_to_a_fixed_point or accelerator_forms_match_lax "
                     "or platform_selects")
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
             "torch", "torchdeq", "jaxopt", "tensorflow", "tensorflow-cpu",
             "tensorflow-datasets", "tensorboardX", "pytest", "pytest-xdist")
# Seconds kept back from the budget for writing the report.
_RESERVE_S = 5.0
# A part is not started with less than this left: it could not finish.
_MIN_PART_S = 20.0


@config
class CheckSettings:
  """What one run of the device check does.

  Attributes:
    quick: the CPU-sized variant (see the module docstring).
    tests: pytest files of the ``tests`` part.
    test_filter: pytest ``-k`` expression (None: every test of the files).
    test_workers: pytest-xdist workers (0: none; used only when xdist is installed).
    batches: MDEQ-Tiny batch sizes of the throughput parts.
    steps: timed steps per batch size.
    solver_budget: None for the config's budgets, else the quick budget.
    bench_workloads: the benchmark's workloads, one part each.
    bench_options: extra options of every benchmark run.
    budget_s: wall-clock budget of the whole check.
    part_timeouts: per-part ceilings in seconds, ``(name, seconds)`` pairs.
  """
  quick: bool = False
  tests: tuple = FULL_TESTS
  test_filter: Optional[str] = None
  test_workers: int = 0
  batches: tuple = (64, 256)
  steps: int = 10
  solver_budget: Optional[int] = None
  bench_workloads: tuple = ("w1", "w2", "w3")
  bench_options: tuple = ()
  budget_s: float = 470.0
  part_timeouts: tuple = ()

  def __post_init__(self) -> None:
    require(len(self.tests) > 0, self, "tests must name at least one file")
    require(isinstance(self.test_workers, int) and self.test_workers >= 0, self,
            f"test_workers must be an integer >= 0, got {self.test_workers!r}")
    require_positive(self, budget_s=self.budget_s, steps=self.steps)

  def timeout(self, part: str) -> float:
    """The ceiling of ``part`` (the whole budget when none is set)."""
    return dict(self.part_timeouts).get(part, self.budget_s)


def default_test_workers() -> int:
  """4 pytest-xdist workers on a machine with 8 cores or more (the tests are bound by
  XLA compiling on one core each), else none (and none without pytest-xdist)."""
  if importlib.util.find_spec("xdist") is None:
    return 0
  return 4 if (os.cpu_count() or 1) >= 8 else 0


def settings_for(quick: bool, budget_s: Optional[float] = None) -> CheckSettings:
  """The full check (sized for ≤ 8 minutes on one GPU) or the quick one (a CPU)."""
  if quick:
    return CheckSettings(
        quick=True, tests=QUICK_TESTS, test_filter=QUICK_TEST_FILTER, test_workers=0,
        batches=(8,), steps=2, solver_budget=4, bench_workloads=("w1", "w2"),
        bench_options=("--variants", "anderson/ift", "--scale", "0.05", "--rounds", "1",
                       "--warmup", "1", "--no-memory"),
        budget_s=budget_s or 170.0)
  return CheckSettings(
      test_workers=default_test_workers(), budget_s=budget_s or 470.0,
      part_timeouts=(("devices", 120.0), ("tests", 200.0), ("throughput_ift", 130.0),
                     ("throughput_unrolled", 100.0), ("bench_w1", 120.0),
                     ("bench_w2", 120.0), ("bench_w3", 150.0)))


class PartFailure(Exception):
  """A part did not pass; the message says why (its error output's end included)."""


def run_process(command: Sequence[str], *, timeout: float,
                env: Optional[dict] = None) -> subprocess.CompletedProcess:
  """Runs ``command`` in the repository root; output captured as text.

  Raises:
    PartFailure: if it runs past ``timeout`` seconds (it is killed).
  """
  try:
    return subprocess.run(list(command), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired as error:
    tail = (error.stderr or b"")
    tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    raise PartFailure(f"timed out after {timeout:.0f} s: {' '.join(command[:4])} ..."
                      f"\n{tail[-1500:]}") from None


def _last_json_line(finished: subprocess.CompletedProcess, what: str) -> dict:
  if finished.returncode != 0:
    raise PartFailure(f"{what} exited with code {finished.returncode}:\n"
                      f"{finished.stderr[-3000:]}")
  lines = [l for l in finished.stdout.strip().splitlines() if l.startswith("{")]
  if not lines:
    raise PartFailure(f"{what} printed no result:\n{finished.stdout[-1500:]}"
                      f"\n{finished.stderr[-1500:]}")
  return json.loads(lines[-1])


def child_environment(**extra: str) -> dict[str, str]:
  """This process's environment with the repository on the path, plus ``extra``."""
  path = os.environ.get("PYTHONPATH", "")
  return dict(os.environ, PYTHONPATH=REPO_ROOT + (os.pathsep + path if path else ""),
              PYTHONUNBUFFERED="1", **extra)


# --- the parts ----------------------------------------------------------------------


def versions() -> dict[str, Optional[str]]:
  """Python and the installed versions of :data:`VERSIONED` and any jax plugin
  (None: not installed). Read from package metadata: nothing is imported."""
  found: dict[str, Optional[str]] = {"python": platform_lib.python_version()}
  for name in VERSIONED:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  for dist in importlib.metadata.distributions():
    name = dist.metadata.get("Name", "") or ""
    if name.lower().startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu")):
      found[name] = dist.version
  return found


def part_devices(timeout: float) -> dict[str, Any]:
  """The JAX devices, from :mod:`experiments.device_check.probe`."""
  finished = run_process([sys.executable, "-m", "experiments.device_check.probe"],
                         timeout=timeout, env=child_environment())
  return _last_json_line(finished, "the device probe")


def junit_counts(path: str) -> dict[str, Any]:
  """Tests, failures, errors, skips and the skip reasons of a pytest JUnit XML file."""
  root = ElementTree.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  counts = {key: sum(int(s.get(key, 0)) for s in suites)
            for key in ("tests", "failures", "errors", "skipped")}
  reasons = sorted({(c.find("skipped").get("message") or "")[:200]
                    for c in root.iter("testcase") if c.find("skipped") is not None})
  failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None]
  counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
  counts["skip_reasons"] = reasons
  counts["failed_tests"] = failed
  return counts


def part_tests(settings: CheckSettings, platform: str, out: str,
               timeout: float) -> dict[str, Any]:
  """pytest on :attr:`CheckSettings.tests`, run on ``platform``."""
  xml = os.path.join(out, "tests.xml")
  command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
             f"--junitxml={xml}", *settings.tests]
  if settings.test_filter:
    command += ["-k", settings.test_filter]
  if settings.test_workers > 0:
    command += ["-n", str(settings.test_workers)]
  start = time.perf_counter()
  # Allocate on demand: JAX's default takes most of a GPU's memory per process, and
  # the pytest-xdist workers share one device.
  finished = run_process(command, timeout=timeout, env=child_environment(
      JDEQ_TEST_PLATFORM=platform, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
  seconds = time.perf_counter() - start
  with open(os.path.join(out, "tests.log"), "w") as log:
    log.write(finished.stdout + "\n" + finished.stderr)
  if not os.path.exists(xml):
    raise PartFailure(f"pytest wrote no report (code {finished.returncode}):\n"
                      f"{finished.stdout[-2000:]}\n{finished.stderr[-1000:]}")
  figures = {"files": list(settings.tests), "filter": settings.test_filter,
             "workers": settings.test_workers, "platform": platform,
             "pytest_s": seconds, "returncode": finished.returncode,
             **junit_counts(xml)}
  if finished.returncode != 0 or figures["failures"] or figures["errors"]:
    raise PartFailure(f"pytest: {figures['failures']} failed, {figures['errors']} errors "
                      f"(code {finished.returncode}): {figures['failed_tests'][:10]}\n"
                      f"{finished.stdout[-2000:]}", )
  if figures["tests"] == 0:
    raise PartFailure("pytest ran no test")
  return figures


def part_throughput(settings: CheckSettings, mode: str, timeout: float) -> dict[str, Any]:
  """MDEQ-Tiny training throughput in ``mode`` (:mod:`.throughput`, own process)."""
  request = {"mode": mode, "batches": list(settings.batches), "steps": settings.steps,
             "budget": settings.solver_budget}
  finished = run_process(
      [sys.executable, "-m", "experiments.device_check.throughput", json.dumps(request)],
      timeout=timeout, env=child_environment())
  result = _last_json_line(finished, f"the {mode} throughput run")
  bad = [r["batch"] for r in result["runs"] if r["nonfinite"]]
  if bad:
    raise PartFailure(f"non-finite loss or gradients at batch {bad}")
  return result


def torch_side(platform: str, timeout: float = 120.0) -> dict[str, Any]:
  """Where the benchmark's TorchDEQ side can run beside jdeq on ``platform``.

  Returns ``{"use": bool, "python", "device", "reason", "torch", "torchdeq"}``.
  """
  candidates = [os.environ.get("JDEQ_BENCH_TORCH_PYTHON"),
                os.path.join(REPO_ROOT, ".venv-bench", "bin", "python"), sys.executable]
  code = ("import json, torch, torchdeq; print(json.dumps({'torch': torch.__version__, "
          "'torchdeq': getattr(torchdeq, '__version__', '0.1.0'), "
          "'cuda': bool(torch.cuda.is_available())}))")
  tried = []
  for python in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
    try:
      finished = subprocess.run([python, "-c", code], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      tried.append(f"{python}: timed out")
      continue
    if finished.returncode != 0:
      lines = finished.stderr.strip().splitlines()
      tried.append(f"{python}: {lines[-1] if lines else 'failed'}")
      continue
    found = json.loads(finished.stdout.strip().splitlines()[-1])
    side = {"python": python, "torch": found["torch"], "torchdeq": found["torchdeq"]}
    if platform == "cpu":
      return {**side, "use": True, "device": "cpu", "reason": "torch and torchdeq found"}
    if platform == "gpu" and found["cuda"]:
      return {**side, "use": True, "device": "cuda",
              "reason": "torch and torchdeq found, torch sees CUDA"}
    return {**side, "use": False, "device": None,
            "reason": f"torchdeq found but torch cannot run on the {platform} device; "
                      "jdeq alone (a device against a CPU is no comparison)"}
  return {"use": False, "python": None, "device": None, "torch": None, "torchdeq": None,
          "reason": "no interpreter with torch and torchdeq (" + "; ".join(tried or
                                                                         ["none found"])
                    + "); jdeq alone"}


def summarize_bench(results: dict) -> dict[str, Any]:
  """The figures of a benchmark ``results.json`` that the report shows."""
  cells = []
  for cell in results.get("cells", []):
    jdeq_side = cell["jdeq"]
    row = {"workload": cell["workload"], "variant": cell["variant"],
           "jdeq_step_ms": jdeq_side["timings"]["step"]["median"] * 1e3,
           "jdeq_compile_s": jdeq_side["compile"]["compile_s"],
           "jdeq_temp_bytes": jdeq_side["compile"]["temp_bytes"],
           "jdeq_overhead": jdeq_side["overhead"],
           "forward_evaluations": jdeq_side["counts"]["forward_evaluations"],
           "diverged": jdeq_side["counts"]["diverged"]}
    if "torch" in cell:
      row["torch_step_ms"] = cell["torch"]["timings"]["step"]["median"] * 1e3
      row["step_speedup"] = cell["speedup"]["step"]
    cells.append(row)
  memory = [{"workload": m["workload"], "variant": m["variant"],
             "forward_iters": m["forward_iters"], "jdeq_temp_bytes": m["jdeq_temp_bytes"],
             "torch": m.get("torch")} for m in results.get("memory", [])]
  return {"device": results.get("device"), "torch_device": results.get("torch_device"),
          "wall_s": results.get("wall_s"), "cells": cells, "memory": memory}


def part_bench(settings: CheckSettings, workload: str, torch: dict, out: str,
               timeout: float) -> dict[str, Any]:
  """``python -m experiments.bench`` on one workload, into ``out/bench_<workload>``."""
  folder = os.path.join(out, f"bench_{workload}")
  command = [sys.executable, "-m", "experiments.bench", "--workloads", workload,
             "--out", folder, "--readme", "", *settings.bench_options]
  extra = {}
  if torch["use"]:
    command += ["--torch-python", torch["python"]]
    extra["JDEQ_BENCH_TORCH_DEVICE"] = torch["device"]
  else:
    command.append("--no-torch")
  finished = run_process(command, timeout=timeout, env=child_environment(**extra))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "bench.log"), "w") as log:
    log.write(finished.stdout + "\n" + finished.stderr)
  if finished.returncode != 0:
    raise PartFailure(f"the benchmark exited with code {finished.returncode}:\n"
                      f"{finished.stderr[-3000:]}")
  with open(os.path.join(folder, "results.json")) as handle:
    summary = summarize_bench(json.load(handle))
  summary["torch_side"] = "TorchDEQ on " + torch["device"] if torch["use"] else "jdeq alone"
  summary["options"] = list(settings.bench_options)
  if not summary["cells"]:
    raise PartFailure("the benchmark measured no cell")
  return summary


# --- orchestration ------------------------------------------------------------------


def run_part(name: str, body: Callable[[float], dict], settings: CheckSettings,
             deadline: float) -> dict[str, Any]:
  """Runs one part within its timeout and the check's deadline; never raises."""
  left = deadline - time.perf_counter() - _RESERVE_S
  if left < _MIN_PART_S:
    return {"name": name, "status": "skipped", "seconds": 0.0,
            "error": f"not started: {max(left, 0):.0f} s of the budget left"}
  timeout = min(settings.timeout(name), left)
  print(f"[device_check] {name} (up to {timeout:.0f} s) ...", flush=True)
  start = time.perf_counter()
  try:
    figures = body(timeout)
    status, error = "passed", None
  except Exception as failure:  # pylint: disable=broad-except  (recorded, others go on)
    figures, status = {}, "failed"
    error = (str(failure) if isinstance(failure, PartFailure)
             else f"{type(failure).__name__}: {failure}")
  seconds = time.perf_counter() - start
  print(f"[device_check] {name}: {status} in {seconds:.1f} s"
        + (f"\n{error[-800:]}" if error else ""), flush=True)
  return {"name": name, "status": status, "seconds": seconds, "error": error,
          "figures": figures}


def run_check(settings: CheckSettings, out: str) -> dict[str, Any]:
  """Every part, in order; the result is what ``device_check.json`` holds."""
  started = time.perf_counter()
  deadline = started + settings.budget_s
  out = os.path.abspath(out)  # the parts run in the repository root
  os.makedirs(out, exist_ok=True)
  parts = [run_part("devices", part_devices, settings, deadline)]
  devices = parts[0].get("figures") or {}
  platform = devices.get("platform", "cpu")
  parts.append(run_part("tests", lambda t: part_tests(settings, platform, out, t),
                        settings, deadline))
  for mode in ("ift", "unrolled"):
    parts.append(run_part(f"throughput_{mode}",
                          lambda t, mode=mode: part_throughput(settings, mode, t),
                          settings, deadline))
  torch = torch_side(platform)
  print(f"[device_check] TorchDEQ side: {torch['reason']}", flush=True)
  for workload in settings.bench_workloads:
    parts.append(run_part(
        f"bench_{workload}",
        lambda t, workload=workload: part_bench(settings, workload, torch, out, t),
        settings, deadline))
  return {
      "passed": all(p["status"] == "passed" for p in parts),
      "quick": settings.quick, "platform": platform,
      "devices": devices.get("devices", []), "versions": {**versions(),
                                                          **devices.get("versions", {})},
      "torch_side": torch, "settings": _settings_dict(settings),
      "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS",
                                                     "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                     "XLA_PYTHON_CLIENT_MEM_FRACTION")},
      "host": {"machine": platform_lib.machine(), "cpus": os.cpu_count()},
      "parts": parts, "wall_s": time.perf_counter() - started,
  }


def _settings_dict(settings: CheckSettings) -> dict:
  return {name: (list(value) if isinstance(value, tuple) else value)
          for name, value in vars(settings).items()}


# --- the report ---------------------------------------------------------------------


def _mib(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value / 2**20:.1f}"


def _figures(result: dict, name: str) -> dict:
  for part in result["parts"]:
    if part["name"] == name:
      return part.get("figures") or {}
  return {}


def markdown(result: dict) -> str:
  """``device_check.md``: the devices, each part's status, and the figures as tables."""
  lines = [f"# jdeq device check{' (quick)' if result['quick'] else ''}", "",
           f"Result: **{'passed' if result['passed'] else 'FAILED'}** on platform "
           f"`{result['platform']}` in {result['wall_s']:.0f} s.", "", "## Devices", ""]
  for device in result["devices"] or [{"platform": "unknown", "device_kind": "?",
                                       "id": "?", "bytes_limit": None}]:
    lines.append(f"- {device['id']}: {device['platform']} / {device['device_kind']}, "
                 f"allocator limit {_mib(device.get('bytes_limit'))} MiB")
  lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()
                                         if v is not None),
            "Not installed: " + (", ".join(k for k, v in result["versions"].items()
                                           if v is None) or "none"),
            f"TorchDEQ side: {result['torch_side']['reason']}.", "", "## Parts", "",
            "| part | status | seconds |", "|---|---|---|"]
  for part in result["parts"]:
    lines.append(f"| {part['name']} | {part['status']} | {part['seconds']:.1f} |")

  tests = _figures(result, "tests")
  if tests:
    lines += ["", "## Tests on the device", "",
              f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
              f"{tests['skipped']} skipped in {tests['pytest_s']:.0f} s "
              f"(`{' '.join(tests['files'])}`"
              + (f", `-k {tests['filter']}`" if tests["filter"] else "")
              + (f", {tests['workers']} workers" if tests["workers"] else "") + ")."]
    for reason in tests["skip_reasons"]:
      lines.append(f"- skipped: {reason}")

  rows = [run for mode in ("ift", "unrolled")
          for run in _figures(result, f"throughput_{mode}").get("runs", [])]
  if rows:
    lines += ["", "## MDEQ-Tiny training (random CIFAR-shaped data)", "",
              "| mode | batch | compile s | first step s | step ms (median) | images/s "
              "| peak device MiB | XLA temp MiB | fwd NFE |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in rows:
      lines.append(f"| {run['mode']} | {run['batch']} | {run['compile_s']:.1f} | "
                   f"{run['first_step_s']:.2f} | {run['step_s'] * 1e3:.1f} | "
                   f"{run['images_per_s']:.1f} | {_mib(run['peak_bytes_in_use'])} | "
                   f"{_mib(run['temp_bytes'])} | {run['fwd_nfe']:.1f} |")
    lines.append("")
    lines.append("Peak device MiB is the allocator's peak in that mode's process "
                 "(n/a: the backend keeps no statistics, as XLA:CPU); XLA temp is the "
                 "step's compile-time working memory.")

  bench_rows = [(name, cell) for name in (p["name"] for p in result["parts"])
                if name.startswith("bench_")
                for cell in _figures(result, name).get("cells", [])]
  if bench_rows:
    lines += ["", "## Benchmark (experiments.bench)", "",
              "| workload | variant | jdeq step ms | jdeq compile s | jdeq temp MiB | "
              "overhead | TorchDEQ step ms | step speedup |", "|---|---|---|---|---|---|---|---|"]
    for _, cell in bench_rows:
      torch_ms = f"{cell['torch_step_ms']:.3g}" if "torch_step_ms" in cell else "–"
      speedup = f"{cell['step_speedup']:.2f}×" if "step_speedup" in cell else "–"
      lines.append(f"| {cell['workload']} | {cell['variant']} | {cell['jdeq_step_ms']:.3g} "
                   f"| {cell['jdeq_compile_s']:.1f} | {_mib(cell['jdeq_temp_bytes'])} | "
                   f"{cell['jdeq_overhead']:.2f} | {torch_ms} | {speedup} |")
    memory = [m for name in (p["name"] for p in result["parts"]) if name.startswith("bench_")
              for m in _figures(result, name).get("memory", [])]
    if memory:
      lines += ["", "| workload | variant | forward budget | jdeq temp MiB |",
                "|---|---|---|---|"]
      lines += [f"| {m['workload']} | {m['variant']} | {m['forward_iters']} | "
                f"{_mib(m['jdeq_temp_bytes'])} |" for m in memory]

  compiles = [(f"MDEQ-Tiny {r['mode']} step, batch {r['batch']}", r["compile_s"])
              for r in rows]
  compiles += [(f"bench {c['workload']} {c['variant']} step", c["jdeq_compile_s"])
               for _, c in bench_rows]
  if compiles:
    lines += ["", "## Compile times", "", "| program | compile s |", "|---|---|"]
    lines += [f"| {what} | {seconds:.2f} |" for what, seconds in compiles]

  failed = [p for p in result["parts"] if p["status"] != "passed"]
  if failed:
    lines += ["", "## Failures", ""]
    for part in failed:
      lines += [f"### {part['name']} ({part['status']})", "", "```",
                (part["error"] or "")[-3000:], "```", ""]
  return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Checks jdeq on the default JAX device and records its figures.")
  parser.add_argument("--out", required=True, help="folder for device_check.json/.md")
  parser.add_argument("--quick", action="store_true",
                      help="the same code paths, sized for a few minutes on a CPU")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="wall-clock budget of the whole check (default 470, quick 170)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  result = run_check(settings_for(args.quick, args.budget_s), args.out)
  with open(os.path.join(args.out, "device_check.json"), "w") as handle:
    json.dump(result, handle, indent=2)
  with open(os.path.join(args.out, "device_check.md"), "w") as handle:
    handle.write(markdown(result))
  print(f"[device_check] {'passed' if result['passed'] else 'FAILED'} in "
        f"{result['wall_s']:.0f} s; report: {os.path.join(args.out, 'device_check.md')}",
        flush=True)
  return 0 if result["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())

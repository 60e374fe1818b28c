"""Multi-process training: two processes on localhost against one process.

The end-to-end check launches a job of two processes (two CPU devices each, gloo
collectives over 127.0.0.1) that trains the tiny DEQ for a few steps, checkpoints
and stops, then a second two-process job that resumes from that checkpoint and
trains on; the oracle is one uninterrupted process with four devices running the
same configuration. The per-step losses, the final evaluation and the final
parameters must agree. The remaining checks are fast single-process checks of the
pieces (flags, argument validation, the primary-only writers, batch rows).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import train as cli
from jdeq import train
from jdeq.train import distributed, reporting, sharding, testing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Steps of the first two-process job, and of the whole run.
FIRST_STEPS, TOTAL_STEPS = 3, 6
# Bound of every launch (all its processes); the test takes 30-60 s on 2 cores.
LAUNCH_TIMEOUT_S = 90
# The all-reduces over gloo (two processes) and within one process sum in
# different orders: the losses differ from the first step on by an ulp, and after
# six Adam steps by at most 4e-7 (losses) and 2e-6 (parameters) as measured; the
# bounds leave a factor of 10.
LOSS_ATOL, PARAM_ATOL = 5e-6, 2e-5
# Every parameter array moves by more than this in six steps (training happened).
MIN_MOVE = 1e-3

_JOB = textwrap.dedent("""
    import json, sys
    coordinator, workdir = sys.argv[1], sys.argv[4]
    num_processes, process_id, total_steps = map(int, sys.argv[2:4] + sys.argv[5:6])
    from jdeq.train import distributed
    if num_processes > 1:
      distributed.initialize(coordinator, num_processes, process_id, timeout_s=60)
    import jax
    from flax import nnx
    from jdeq import train
    from jdeq.train import testing

    assert jax.process_count() == num_processes and jax.device_count() == 4
    images, labels = testing.synthetic_dataset(64, (4, 4, 1))
    # A constant learning rate: a run stopped after k steps and resumed to n then
    # follows the same schedule as one run of n steps.
    config = train.TrainConfig(
        total_steps=total_steps, optimizer="adam", lr=0.05, schedule="constant",
        log_every=1, checkpoint_every=2, keep_last_k=2, jac_gamma=0.5, jac_prob=1.0,
        forward_budget=10, jac_budget_jitter=2)
    model = testing.TinyDEQClassifier((4, 4, 1), 3, dropout=0.2, rngs=nnx.Rngs(0))
    report = train.fit(
        model, config,
        train_batches=lambda start: testing.in_memory_train_batches(
            images, labels, 8, start_step=start),
        eval_batches=lambda: testing.in_memory_eval_batches(images, labels, 12),
        steps_per_epoch=8, workdir=workdir, progress=True)
    # Every process reads the checkpoint's metadata and rejects a narrower model.
    narrow = testing.TinyDEQClassifier((4, 4, 1), 3, width=8, rngs=nnx.Rngs(0))
    template = train.replicate(train.create_train_state(
        narrow, train.make_optimizer(config, 8), seed=0), train.data_mesh())
    checkpointer = train.Checkpointer(workdir + "/checkpoints")
    try:
      checkpointer.restore(template)
      mismatch = "restored"
    except train.CheckpointError as error:
      mismatch = str(error)
    checkpointer.close()
    print("REPORT " + json.dumps({"process": jax.process_index(),
                                  "resumed_from": report["resumed_from"],
                                  "final_test": report["final_test"],
                                  "plots": report["plots"],
                                  "mismatch": mismatch}), flush=True)
""")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _environment(devices: int, cache: pathlib.Path) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")  # conftest's flags (compile speed) too
  return dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
              # The resumed job loads the first job's compiled programs.
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class _Job:
  """The processes of one launch; :meth:`wait` kills them all on any failure."""

  def __init__(self, script, workdir, total_steps, num_processes, cache):
    devices = 4 // num_processes
    coordinator = f"127.0.0.1:{_free_port()}"
    # The coordination service listens on the loopback interface only.
    env = dict(_environment(devices, cache), JAX_COORDINATOR_BIND_ADDRESS=coordinator)
    self.logs, self.processes = [], []
    for process_id in range(num_processes):
      log = open(workdir.parent / f"{workdir.name}.{total_steps}.{process_id}.log",
                 "w+")
      self.logs.append(log)
      self.processes.append(subprocess.Popen(
          [sys.executable, str(script), coordinator, str(num_processes),
           str(process_id), str(workdir), str(total_steps)],
          cwd=REPO_ROOT, env=env, stdout=log,
          stderr=subprocess.STDOUT, text=True, start_new_session=True))

  def outputs(self) -> list[str]:
    texts = []
    for log in self.logs:
      log.flush()
      log.seek(0)
      texts.append(log.read())
    return texts

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
    for process in self.processes:
      process.wait()

  def close(self) -> None:
    self.kill()
    for log in self.logs:
      log.close()

  def wait(self, deadline: float) -> list[str]:
    """Outputs of every process; fails at the first crash or at ``deadline``."""
    try:
      while any(process.poll() is None for process in self.processes):
        failed = [p.returncode for p in self.processes
                  if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
          self.kill()
          outputs = "\n".join(f"--- process {index} ---\n{text[-3000:]}"
                              for index, text in enumerate(self.outputs()))
          reason = f"exit codes {failed}" if failed else "timeout"
          pytest.fail(f"job failed ({reason}):\n{outputs}")
        time.sleep(0.1)
      outputs = self.outputs()
      for index, (process, text) in enumerate(zip(self.processes, outputs)):
        assert process.returncode == 0, f"process {index}:\n{text[-6000:]}"
      return outputs
    finally:
      self.close()


def _report(output: str) -> dict:
  lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
  assert len(lines) == 1, output[-3000:]
  return json.loads(lines[0][len("REPORT "):])


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  records = reporting.read_records(str(workdir / "metrics.jsonl"))
  steps = [r["step"] for r in records if r["kind"] == "train"]
  assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _final_params(workdir: pathlib.Path) -> list[np.ndarray]:
  """The last checkpoint's parameters, restored here in one process on one device."""
  config = train.TrainConfig(total_steps=TOTAL_STEPS, optimizer="adam",
                             schedule="constant")
  model = testing.TinyDEQClassifier((4, 4, 1), 3, dropout=0.2, rngs=nnx.Rngs(1))
  template = train.create_train_state(model, train.make_optimizer(config, 8), seed=1)
  checkpointer = train.Checkpointer(workdir / "checkpoints")
  try:
    assert checkpointer.latest_step() == TOTAL_STEPS
    state, _ = checkpointer.restore(template)
  finally:
    checkpointer.close()
  assert int(state.step) == TOTAL_STEPS
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_two_process_training_with_resume_equals_one_process(tmp_path):
  start = time.monotonic()
  deadline = start + 2 * LAUNCH_TIMEOUT_S  # the two launches run one after the other
  script = tmp_path / "job.py"
  script.write_text(_JOB)
  cache = tmp_path / "jax_cache"
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"

  jobs = []
  try:
    # The reference runs beside the first job: the two processes leave a core
    # idle while they wait on each other.
    jobs.append(reference := _Job(script, single, TOTAL_STEPS, 1, cache))
    jobs.append(first := _Job(script, multi, FIRST_STEPS, 2, cache))
    first_outputs = first.wait(min(deadline, time.monotonic() + LAUNCH_TIMEOUT_S))
    jobs.append(resumed := _Job(script, multi, TOTAL_STEPS, 2, cache))
    resumed_outputs = resumed.wait(min(deadline, time.monotonic() + LAUNCH_TIMEOUT_S))
    reference_output, = reference.wait(
        min(deadline, max(start + LAUNCH_TIMEOUT_S, time.monotonic() + 10)))
  finally:
    for job in jobs:  # a failed launch leaves none of the others running
      job.close()

  # Only process 0 reports: the final line is printed once, plots drawn once.
  for outputs in (first_outputs, resumed_outputs):
    assert "final test accuracy" in outputs[0]
    assert "final test accuracy" not in outputs[1] and "train:" not in outputs[1]
    assert _report(outputs[0])["plots"] and _report(outputs[1])["plots"] == []
  assert [_report(o)["resumed_from"] for o in resumed_outputs] == [FIRST_STEPS] * 2
  for output in first_outputs + resumed_outputs:
    assert "does not match the model" in _report(output)["mismatch"]
  assert len(list(multi.glob("events.out.tfevents.*"))) == 2  # one per job

  losses = _train_losses(multi)
  expected_losses = _train_losses(single)
  assert sorted(losses) == sorted(expected_losses) == list(range(1, TOTAL_STEPS + 1))
  loss_difference = max(abs(losses[s] - expected_losses[s]) for s in losses)
  assert loss_difference <= LOSS_ATOL, (losses, expected_losses)

  # The evaluation is global: every sample of the split once, the padding none.
  final = [_report(output)["final_test"] for output in resumed_outputs]
  expected_final = _report(reference_output)["final_test"]
  for summary in final + [expected_final]:
    summary.pop("images_per_s")  # each process's own clock
  assert final[0] == final[1]
  assert final[0]["samples"] == expected_final["samples"] == 64
  assert final[0]["accuracy"] == expected_final["accuracy"]
  np.testing.assert_allclose(final[0]["loss"], expected_final["loss"], atol=LOSS_ATOL)
  with open(multi / "report.json") as handle:
    assert json.load(handle)["final_test"]["samples"] == 64

  params, expected_params = _final_params(multi), _final_params(single)
  initial = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(
      testing.TinyDEQClassifier((4, 4, 1), 3, rngs=nnx.Rngs(0)), nnx.Param))]
  assert len(params) == len(expected_params) == len(initial)
  param_difference = max(float(np.max(np.abs(a - b)))
                         for a, b in zip(params, expected_params))
  moved = min(float(np.max(np.abs(a - b))) for a, b in zip(params, initial))
  assert param_difference <= PARAM_ATOL and moved > MIN_MOVE
  print(f"max |loss difference| {loss_difference:.3g}, max |parameter difference| "
        f"{param_difference:.3g}, {time.monotonic() - start:.1f} s")


# --- the pieces, in this process ------------------------------------------------------

@pytest.mark.parametrize("arguments, message", [
    (("localhost", 2, 0), "not of the form HOST:PORT"),
    (("10.0.0.1:99999", 2, 0), "not of the form HOST:PORT"),
    (("10.0.0.1:1234", 0, 0), "num_processes must be a positive integer"),
    (("10.0.0.1:1234", 2, -1), "process_id must be a non-negative integer"),
    (("10.0.0.1:1234", 2, 2), "process_id 2 is out of range for 2 processes"),
])
def test_initialize_rejects_bad_arguments_before_touching_jax(arguments, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*arguments)
  assert not distributed.is_initialized()


def test_cli_cluster_flags_need_distributed(capsys):
  assert cli.main(["--config", "mnist_convdeq", "--process-id", "1"]) == 2
  assert "--process-id needs --distributed" in capsys.readouterr().err
  assert cli.main(["--config", "mnist_convdeq", "--distributed", "--coordinator",
                   "nohost", "--num-processes", "2", "--process-id", "0"]) == 2
  assert "not of the form HOST:PORT" in capsys.readouterr().err


def test_other_processes_write_and_print_nothing(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  log = reporting.MetricsLog(str(path), tensorboard_dir=str(tmp_path), primary=False)
  log.write({"kind": "train", "step": 1, "loss": 0.5})
  log.close()
  reporting.write_report(str(tmp_path / "report.json"), {"a": 1}, primary=False)
  assert reporting.plot_curves([], str(tmp_path), primary=False) == []
  bar = reporting.ProgressBar(total=3, primary=False)
  bar.write("from the bar")
  bar.update(3)
  bar.close()
  reporting.echo("echoed", primary=False)
  assert list(tmp_path.iterdir()) == []
  assert capsys.readouterr() == ("", "")

  primary_log = reporting.MetricsLog(str(path), primary=True)
  primary_log.write({"kind": "train", "step": 1, "loss": 0.5})
  reporting.echo("echoed", primary=True)
  assert reporting.read_records(str(path)) == [{"kind": "train", "step": 1,
                                                "loss": 0.5}]
  assert capsys.readouterr().out == "echoed\n"


def test_one_process_feeds_every_row_and_decides_alone():
  mesh = train.data_mesh()
  assert sharding.process_rows(mesh, 8 * mesh.size) == slice(0, 8 * mesh.size)
  assert distributed.primary_decides(True, sync_point=False)
  assert not distributed.primary_decides(False)
  assert distributed.is_primary() and distributed.process_count() == 1


def test_fingerprint_tells_values_shapes_and_keys_apart():
  tree = {"w": np.arange(6, dtype=np.float32), "key": jax.random.key(0)}
  same = {"w": np.arange(6, dtype=np.float32), "key": jax.random.key(0)}
  assert np.array_equal(distributed.fingerprint(tree), distributed.fingerprint(same))
  for other in ({"w": tree["w"] + (np.arange(6) == 5).astype(np.float32),
                 "key": tree["key"]},
                {"w": tree["w"].reshape(2, 3), "key": tree["key"]},
                {"w": tree["w"], "key": jax.random.key(1)}):
    assert not np.array_equal(distributed.fingerprint(tree),
                              distributed.fingerprint(other))


def test_cpu_collectives_choice_in_the_environment_stands(monkeypatch):
  monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "mpi")
  assert distributed.use_cpu_collectives() is False

"""The TorchDEQ side of the benchmark: a worker process in the TorchDEQ environment.

It never imports JAX. The runner starts it with the interpreter of the TorchDEQ
virtual environment (``requirements-bench.txt``) and talks to it in JSON lines:

* ``{"cmd": "setup", "workload": "w1", "variant": "anderson/ift"}`` builds a cell,
  warms it up and returns its number of trainable parameters;
* ``{"cmd": "time", "reps": n}`` runs ``n`` timed training steps of the current cell
  and returns the forward, backward and full-step seconds of each;
* ``{"cmd": "bare", "reps": n, "evaluations": a, "vjps": b}`` times ``a`` bare
  evaluations of the cell's map and ``b`` VJPs;
* ``{"cmd": "counts"}`` runs one counted step: map evaluations, VJPs, residuals;
* ``{"cmd": "info"}`` describes the device and the library versions;
* ``{"cmd": "quit"}``.

``python -m experiments.bench.torch_side --memory '{"workload": ..., "variant": ...,
"forward_iters": ...}'`` instead measures one training step's peak memory in this
fresh process and prints one JSON line.

Each step follows TorchDEQ's documented training loop: ``reset_deq`` on the cell
(weight norm computed once per step, fresh dropout masks), the injection computed
once, ``deq(f, z0)`` with the solver and gradient chosen through ``get_deq``
options, a head and a cross-entropy loss, ``loss.backward()``, an SGD step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torchdeq
from torch import nn
from torch.nn import functional as F
from torchdeq import get_deq, reset_deq
from torchdeq.loss import fp_correction
from torchdeq.norm import apply_norm

from experiments.bench import timing, torch_mdeq, worker, workloads

TORCHDEQ_SOLVER_NAMES = {"fixed_point_iteration": "fixed_point_iter",
                         "anderson": "anderson", "broyden": "broyden"}
LEARNING_RATE = 1e-4
# The device of this side's models and batches: "cpu" unless the runner's
# environment names another (experiments.device_check sets "cuda" on a GPU machine).
DEVICE = torch.device(os.environ.get("JDEQ_BENCH_TORCH_DEVICE", "cpu"))


def _synchronize() -> None:
  """Waits for the device's queued work (CUDA runs asynchronously to the host clock)."""
  if DEVICE.type == "cuda":
    torch.cuda.synchronize(DEVICE)


class _CountVJPs(torch.autograd.Function):
  """Identity whose backward counts how often a VJP passes through the map."""
  count = 0

  @staticmethod
  def forward(ctx, z):
    return z.view_as(z)

  @staticmethod
  def backward(ctx, grad):
    _CountVJPs.count += 1
    return grad


class MLPCell(nn.Module):
  """W1: ``f(z, u) = tanh(W z + u)`` with the injection ``u = U x`` computed once."""

  def __init__(self, arrays):
    super().__init__()
    d = arrays["W_v"].shape[0]
    self.W = nn.Linear(d, d, bias=False)
    self.U = nn.Linear(d, d, bias=False)
    self.head = nn.Linear(d, workloads.NUM_CLASSES)
    with torch.no_grad():
      self.W.weight.copy_(torch.from_numpy(arrays["W_v"]))
      self.U.weight.copy_(torch.from_numpy(arrays["U"]))
      self.head.weight.copy_(torch.from_numpy(arrays["head_w"]))
      self.head.bias.copy_(torch.from_numpy(arrays["head_b"]))
    apply_norm(self.W, "weight_norm")
    with torch.no_grad():
      self.W.weight_g.copy_(torch.from_numpy(arrays["W_g"])[:, None])

  def inject(self, x):
    return self.U(x)

  def map(self, z, u):
    return torch.tanh(self.W(z) + u)

  def initial_state(self, u):
    return torch.zeros_like(u)

  def logits(self, z):
    return self.head(z)


def _conv_weight(hwio: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(hwio.transpose(3, 2, 0, 1)))


class ConvCell(nn.Module):
  """W2: ``f(z, u) = GroupNorm(ReLU(conv2(ReLU(conv1 z)) + u))``, ``u = inj(x)`` once."""

  def __init__(self, arrays):
    super().__init__()
    c = arrays["conv1_v"].shape[-1]
    c_in = arrays["inj_w"].shape[2]
    self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
    self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=True)
    self.inj = nn.Conv2d(c_in, c, 3, padding=1, bias=True)
    self.norm = nn.GroupNorm(workloads.W2_GROUPS, c)
    self.head = nn.Linear(c, workloads.NUM_CLASSES)
    with torch.no_grad():
      self.conv1.weight.copy_(_conv_weight(arrays["conv1_v"]))
      self.conv2.weight.copy_(_conv_weight(arrays["conv2_v"]))
      self.conv2.bias.copy_(torch.from_numpy(arrays["conv2_b"]))
      self.inj.weight.copy_(_conv_weight(arrays["inj_w"]))
      self.inj.bias.copy_(torch.from_numpy(arrays["inj_b"]))
      self.norm.weight.copy_(torch.from_numpy(arrays["gn_scale"]))
      self.norm.bias.copy_(torch.from_numpy(arrays["gn_bias"]))
      self.head.weight.copy_(torch.from_numpy(arrays["head_w"]))
      self.head.bias.copy_(torch.from_numpy(arrays["head_b"]))
    for conv, gain in ((self.conv1, "conv1_g"), (self.conv2, "conv2_g")):
      apply_norm(conv, "weight_norm")
      with torch.no_grad():
        conv.weight_g.copy_(torch.from_numpy(arrays[gain])[:, None, None, None])

  def inject(self, x):
    return self.inj(x)

  def map(self, z, u):
    return self.norm(F.relu(self.conv2(F.relu(self.conv1(z))) + u))

  def initial_state(self, u):
    return torch.zeros_like(u)

  def logits(self, z):
    return self.head(z.mean(dim=(2, 3)))


def build_model(workload: str, seed: int = 0):
  """The cell (map, injection, head) and its input batch, as torch tensors (NCHW)."""
  if workload == "w3":
    torch.manual_seed(seed)  # W3's weights are drawn by each framework itself
    model = torch_mdeq.MDEQTiny()
    arrays = workloads.w3_batch(seed)
  else:
    arrays = workloads.initial_arrays(workload, seed)
    model = MLPCell(arrays) if workload == "w1" else ConvCell(arrays)
  x = arrays["x"]
  if x.ndim == 4:
    x = x.transpose(0, 3, 1, 2)
  return (model.to(DEVICE), torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE),
          torch.from_numpy(arrays["labels"]).long().to(DEVICE))


def parameter_count(model: nn.Module) -> int:
  """Trainable scalars of a model (weight norm's ``g`` and ``v`` replace ``weight``)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tensors(state) -> list:
  """The tensors of a state: one tensor (W1, W2) or a list of branches (W3)."""
  return list(state) if isinstance(state, (list, tuple)) else [state]


def deq_options(workload: str, variant: str, forward_iters: int | None = None) -> dict:
  """``torchdeq.get_deq`` options equivalent to the jdeq configuration of ``variant``."""
  spec = workloads.workload(workload)
  forward = spec.forward_iters if forward_iters is None else forward_iters
  solver, gradient = workloads.split_variant(variant)
  if gradient == workloads.UNROLLED:
    # TorchDEQ has no unrolled mode; a zero-budget solve followed by a "phantom"
    # gradient of ``forward`` undamped steps from z0 is exactly plain backprop.
    return dict(core="sliced", f_solver="fixed_point_iter", f_max_iter=0,
                grad=forward, tau=1.0)
  name = TORCHDEQ_SOLVER_NAMES[solver]
  options = dict(core="sliced", f_solver=name, b_solver=name, f_max_iter=forward,
                 b_max_iter=spec.backward_iters, f_tol=workloads.FULL_BUDGET_TOL,
                 b_tol=workloads.FULL_BUDGET_TOL, f_stop_mode="rel", b_stop_mode="abs")
  if gradient == "ift":
    options.update(ift=True)
  elif gradient == "phantom":
    options.update(grad=workloads.PHANTOM_STEPS, tau=workloads.PHANTOM_DAMPING)
  elif gradient == "correction":
    # DEQIndexing samples n_states evenly spaced states of one solve (the last at
    # f_max_iter), each with a one-step gradient; the loss is fp_correction's.
    options.update(core="indexing", n_states=workloads.CORRECTION_STATES, grad=1,
                   tau=1.0)
  else:
    options.update(grad=1, tau=1.0)
  return options


class Cell:
  """One workload × variant, ready to run training steps."""

  def __init__(self, workload: str, variant: str, forward_iters: int | None = None,
               seed: int = 0):
    self.model, self.x, self.labels = build_model(workload, seed)
    self.model.train()
    self.deq = get_deq(**deq_options(workload, variant, forward_iters))
    # Unrolled runs no solve: TorchDEQ's residual statistics are placeholders then.
    self.solves = workloads.split_variant(variant)[1] != workloads.UNROLLED
    self.correction = workloads.split_variant(variant)[1] == "correction"
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
    self.evaluations = 0
    self.counting = False
    self.last_info = None

  def _map(self, u) -> Callable:
    """The map as TorchDEQ calls it: ``f(z)``, or ``f(*branches)`` for a list state."""
    def f(*z):
      z = list(z) if len(z) > 1 else z[0]
      if self.counting:
        self.evaluations += 1
        if isinstance(z, list):  # one VJP through the map passes every branch once
          z = [_CountVJPs.apply(z[0])] + z[1:]
        else:
          z = _CountVJPs.apply(z)
      return self.model.map(z, u)
    return f

  def forward(self):
    reset_deq(self.model)
    u = self.model.inject(self.x)
    z_out, self.last_info = self.deq(self._map(u), self.model.initial_state(u))
    if self.correction:  # Σ_j γ^(N-1-j) CE(z_j), TorchDEQ's "exp" weights
      return fp_correction(F.cross_entropy,
                           ([self.model.logits(z) for z in z_out], self.labels),
                           weight_func="exp", gamma=workloads.CORRECTION_DECAY)
    return F.cross_entropy(self.model.logits(z_out[-1]), self.labels)

  def timed_step(self) -> tuple[float, float, float]:
    """Seconds of the forward pass, the backward pass and the whole step."""
    start = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.forward()
    _synchronize()
    forward_done = time.perf_counter()
    loss.backward()
    _synchronize()
    backward_done = time.perf_counter()
    self.optimizer.step()
    _synchronize()
    end = time.perf_counter()
    return forward_done - start, backward_done - forward_done, end - start

  def counts(self) -> dict:
    """Map evaluations and VJPs of one step, and the forward solve's residuals."""
    self.evaluations, _CountVJPs.count, self.counting = 0, 0, True
    try:
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.forward()
      forward_evaluations = self.evaluations
      loss.backward()
    finally:
      self.counting = False
    info = self.last_info

    def median(key):
      return float(info[key].median()) if self.solves else None

    return {
        "forward_evaluations": forward_evaluations,
        "backward_evaluations": self.evaluations - forward_evaluations,
        "vjps": _CountVJPs.count,
        "forward_rel_residual": median("rel_lowest"),
        "forward_abs_residual": median("abs_lowest"),
    }

  def bare(self, evaluations: int, vjps: int) -> Callable[[], None]:
    """A call running ``evaluations`` plain map evaluations, then ``vjps`` VJPs at the end point."""
    reset_deq(self.model)
    with torch.no_grad():
      u = self.model.inject(self.x)
    f = self._map(u)

    def call():
      with torch.no_grad():
        z = _tensors(self.model.initial_state(u))
        for _ in range(evaluations):
          z = _tensors(f(*z))
      z = [t.requires_grad_() for t in z]
      fz = _tensors(f(*z))
      v = [torch.ones_like(t) for t in z]
      for _ in range(vjps):
        v = list(torch.autograd.grad(fz, z, v, retain_graph=True))
      _synchronize()
    return call


def describe() -> dict:
  where = (f"cuda ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda"
           else worker.cpu_description())
  return {
      "device": f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads",
      "torch": torch.__version__, "torchdeq": getattr(torchdeq, "__version__", "0.1.0"),
  }


def _status_bytes(field: str) -> int:
  """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
  # Writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one.
  with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")


def measure_memory(workload: str, variant: str, forward_iters: int) -> dict:
  """Peak memory of one training step, measured in this (fresh) process.

  Two figures: ``rss_delta_bytes``, the rise of the process's peak resident set
  (``ru_maxrss``) over its resident set just before the step (taken after one
  one-iteration step, so lazy allocations of the first call are not counted), and
  ``saved_bytes``, the bytes of all tensors autograd keeps for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``; storages counted once). The peak
  resident set is reset just before the step (Linux ``clear_refs``), so earlier
  peaks (imports, the warm-up step) are not counted.
  """
  warm = Cell(workload, variant, forward_iters=1)
  warm.optimizer.zero_grad()
  warm.forward().backward()
  del warm
  cell = Cell(workload, variant, forward_iters=forward_iters)
  saved = {}

  def pack(tensor):
    storage = tensor.untyped_storage()
    saved[storage.data_ptr()] = storage.nbytes()
    return tensor

  _reset_peak_rss()
  before = _status_bytes("VmRSS")
  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = cell.forward()
  loss.backward()
  cell.optimizer.step()
  peak = _status_bytes("VmHWM")
  return {"rss_delta_bytes": max(peak - before, 0), "saved_bytes": sum(saved.values())}


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
  """Answers JSON-line requests until ``quit`` or end of input."""
  threads = worker.runner_threads()
  if threads > 0:
    torch.set_num_threads(threads)
  cell = None
  bare_call = None

  def handle(request: dict) -> dict:
    nonlocal cell, bare_call
    command = request.get("cmd")
    if command == "info":
      return describe()
    if command == "setup":
      cell = Cell(request["workload"], request["variant"],
                  request.get("forward_iters"), request.get("seed", 0))
      bare_call = None
      for _ in range(request.get("warmup", 2)):
        cell.timed_step()
      return {"parameters": parameter_count(cell.model)}
    if command == "time":
      steps = [cell.timed_step() for _ in range(request["reps"])]
      return {"forward": [s[0] for s in steps], "backward": [s[1] for s in steps],
              "step": [s[2] for s in steps]}
    if command == "bare":
      if bare_call is None:
        bare_call = cell.bare(request["evaluations"], request["vjps"])
        bare_call()
      return {"bare": timing.time_round(bare_call, request["reps"])}
    if command == "counts":
      return cell.counts()
    raise worker.unknown_command(request)

  worker.serve_json_lines(handle, stdin, stdout)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="TorchDEQ benchmark worker")
  parser.add_argument("--memory", default=None,
                      help="JSON {workload, variant, forward_iters}: measure and exit")
  args = parser.parse_args(argv)
  if args.memory:
    request = json.loads(args.memory)
    print(json.dumps(measure_memory(request["workload"], request["variant"],
                                    request["forward_iters"])))
    return 0
  serve()
  return 0


if __name__ == "__main__":
  sys.exit(main())

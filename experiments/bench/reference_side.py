"""The authors' side of workload w3ref: locuslab/deq's MDEQ-Vision code, as a worker.

It never imports JAX. The runner starts it with a Python that has torch and the
reference's own imports (yacs, termcolor, scipy; ``requirements-bench.txt``) and
talks to it in JSON lines, as to the TorchDEQ worker:

* ``{"cmd": "setup", "reference_dir": DIR, "kind": "equilibrium" | "unrolled",
  "warmup": n}`` builds MDEQ-Tiny from the reference's TINY yaml with its own
  initialization, its optimizer and schedule, runs ``n`` untimed training steps
  and returns the model's number of trainable parameters;
* ``{"cmd": "time", "reps": n}`` runs ``n`` timed training steps, returns their seconds;
* ``{"cmd": "counts"}`` returns the solver figures of the last step: map
  evaluations of the forward solve (of the unrolled layers in pretraining), VJPs of
  the backward solve, and both solves' lowest residuals;
* ``{"cmd": "info"}`` describes the device and torch; ``{"cmd": "quit"}``.

Loading, configuring and building the reference (and guarding its CUDA-only calls
on a CPU) is :mod:`experiments.reference_parity.torch_side`'s; this module only
adds the step and the protocol. A step is the body of the reference's
``core.cls_function.train`` at the yaml's settings — ``model(x, train_step=t)``
with ``t`` the schedule's step count (equilibrium mode once ``t`` reaches the
model's ``pretrain_steps``: Broyden, backward through its hook), cross-entropy,
``backward``, the yaml's Adam, ``CosineAnnealingLR.step`` — without its meters and
logging. The yaml's Jacobian-loss weight is 0, so the reference computes no
Jacobian loss (``compute_jac_loss=False``) and keeps ``F_THRES`` fixed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn

from experiments.bench import worker, workloads
from experiments.reference_parity import torch_side as parity

KINDS = ("equilibrium", "unrolled")
# The schedule's length as the reference's cls_train.py sets it: an epoch of
# CIFAR-10 at the yaml's per-GPU batch 64 on its two GPUs (390 steps) times END_EPOCH.
STEPS_PER_EPOCH = 390


class Step:
  """The reference's MDEQ-Tiny with its optimizer, training in one mode."""

  def __init__(self, mdeq, config, kind: str, seed: int = 0):
    if kind not in KINDS:
      raise ValueError(f"unknown step kind {kind!r}; valid kinds are {list(KINDS)}")
    self.kind = kind
    self.config = config
    self.model = parity.build(mdeq, config, seed, None)  # solvers wrapped in Recorders
    # The mode follows the step count, as in the reference's loop: pretraining
    # (unrolled layers) while it is below pretrain_steps, equilibrium from then on.
    self.model.pretrain_steps = 0 if kind == "equilibrium" else 10 ** 9
    self.map_calls = 0
    self.model.fullstage.register_forward_hook(self._count_map_call)
    from utils.utils import get_optimizer  # the reference's, importable once loaded
    self.optimizer = get_optimizer(config, self.model)
    self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        self.optimizer, STEPS_PER_EPOCH * config.TRAIN.END_EPOCH, eta_min=1e-6)
    self.criterion = nn.CrossEntropyLoss()
    batch = workloads.w3_batch(seed)
    self.x = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(batch["labels"].astype(np.int64))
    self.model.train()
    self.last_map_calls = 0

  def _count_map_call(self, module, inputs, output) -> None:
    del module, inputs, output
    self.map_calls += 1

  def run(self) -> float:
    """One training step; returns its seconds."""
    self.map_calls = 0
    self.model.f_solver.last = self.model.b_solver.last = None
    start = time.perf_counter()
    output, _, _ = self.model(self.x, train_step=self.schedule._step_count - 1,
                              compute_jac_loss=False, f_thres=self.config.DEQ.F_THRES,
                              b_thres=self.config.DEQ.B_THRES, writer=None)
    loss = self.criterion(output, self.labels)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    self.schedule.step()
    seconds = time.perf_counter() - start
    self.last_map_calls = self.map_calls
    return seconds

  def counts(self) -> dict:
    """Solver figures of the last step (None where a mode runs no solve)."""
    forward, backward = self.model.f_solver.last, self.model.b_solver.last
    return {
        # Map evaluations inside the forward solve; in pretraining, the layers.
        "forward_evaluations": (forward["evaluations"] if forward
                                else self.last_map_calls),
        "backward_vjps": backward["evaluations"] if backward else None,
        "forward_rel_residual": forward["lowest"] if forward else None,
        "backward_residual": backward["lowest"] if backward else None,
        # Calls of the multiscale map in the forward pass, the solve's included.
        "map_calls": self.last_map_calls,
    }


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe() -> dict:
  return {"device": f"{worker.cpu_description()}, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads",
          "torch": torch.__version__}


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
  """Answers JSON-line requests until ``quit`` or end of input.

  Whatever the reference prints goes to standard error: standard output carries
  the replies only.
  """
  threads = worker.runner_threads()
  if threads > 0:
    torch.set_num_threads(threads)
  sys.stdout = sys.stderr
  loaded = None  # (models.mdeq, config): the reference is imported once per process
  step = None

  def handle(request: dict) -> dict:
    nonlocal loaded, step
    command = request.get("cmd")
    if command == "info":
      return describe()
    if command == "setup":
      if loaded is None:
        mdeq, config = parity.load_reference(request["reference_dir"])
        loaded = mdeq, parity.reference_config(config, [])
      step = None  # the previous kind's model is freed before the next is built
      step = Step(*loaded, request["kind"], request.get("seed", 0))
      for _ in range(request.get("warmup", 1)):
        step.run()
      return {"parameters": parameter_count(step.model)}
    if command == "time":
      return {"step": [step.run() for _ in range(request["reps"])]}
    if command == "counts":
      return step.counts()
    raise worker.unknown_command(request)

  worker.serve_json_lines(handle, stdin, stdout)


if __name__ == "__main__":
  serve()

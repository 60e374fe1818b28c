"""The PyTorch sides of the time-to-tolerance benchmark: a worker process.

It never imports JAX (only the standard library, NumPy and torch, plus TorchDEQ or
the authors' solvers, whichever side it serves). The driver,
:mod:`experiments.bench.tolerance`, starts it with the interpreter of the TorchDEQ
virtual environment and talks to it in JSON lines:

* ``{"cmd": "load", "arrays": PATH}`` loads the shared workload arrays (an ``.npz``
  the driver wrote from NumPy: ``W``, ``U``, ``x``, ``scale``);
* ``{"cmd": "setup", "solver": "anderson", "tol": 1e-3, "budget": 300}`` builds
  one forward solve of ``f(z)_i = tanh(s_i · W z_i + U x_i)`` from ``z = 0`` and
  runs it ``warmup`` times;
* ``{"cmd": "time", "reps": n}``: the seconds of ``n`` solves;
* ``{"cmd": "stats"}``: one more solve, counted: map evaluations (the batch's, as
  the side evaluates the map on the whole batch), the returned states, and what
  the solver reports per sample;
* ``{"cmd": "info"}``, ``{"cmd": "quit"}``.

Two sides (``--side``):

* ``torchdeq``: ``torchdeq.get_deq(core="sliced", f_solver=..., f_max_iter=budget,
  f_tol=tol, f_stop_mode="rel")`` in eval mode under ``torch.no_grad()``. Its
  solvers stop the whole batch at the first step where every sample's *current*
  relative residual ``‖f(z) − z‖ / ‖f(z)‖`` is below ``tol``; its ``info["nstep"]``
  is per sample, but it is the step of the sample's lowest residual, not the
  evaluations spent on it (every sample gets the batch's count). The per-sample
  residual traces (``info["rel_trace"]``) give the evaluation at which each sample
  first met the tolerance.
* ``reference``: ``broyden(f, z0, threshold=budget, eps=tol, stop_mode="rel")`` of
  the DEQ authors' ``lib/solvers.py`` (``--reference-root``: the directory holding
  ``lib``, put first on ``sys.path``). It measures one residual for the whole batch,
  ``‖F − Z‖_F / ‖F‖_F`` over all samples at once, and stops on it.

Evaluation counts: TorchDEQ's fixed-point iteration and Anderson spend at most
``budget`` evaluations, its Broyden and the reference Broyden ``budget + 1`` (one at
``z0`` before ``budget`` steps).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from experiments.bench import worker

TORCHDEQ_SOLVER_NAMES = {"fixed_point_iteration": "fixed_point_iter",
                         "anderson": "anderson", "broyden": "broyden"}
# TorchDEQ traces: column 0 is a placeholder (1e8); column j >= 1 was recorded after
# j + offset evaluations (Anderson makes two plain steps before its first check,
# Broyden one evaluation at z0 before its first step).
TRACE_OFFSET = {"fixed_point_iteration": 0, "anderson": 2, "broyden": 1}
# Anderson's history size on both sides (TorchDEQ's default; jdeq is set to match).
ANDERSON_MEMORY = 6
SIDES = ("torchdeq", "reference")


class Problem:
  """The shared workload as torch tensors, and its map with an evaluation counter."""

  def __init__(self, path: str):
    with np.load(path) as arrays:
      self.w = torch.from_numpy(np.ascontiguousarray(arrays["W"]))
      self.u_mat = torch.from_numpy(np.ascontiguousarray(arrays["U"]))
      self.x = torch.from_numpy(np.ascontiguousarray(arrays["x"]))
      self.scale = torch.from_numpy(np.ascontiguousarray(arrays["scale"]))[:, None]
    self.evaluations = 0

  def map(self) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(z) = tanh(s ⊙ (z Wᵀ) + x Uᵀ)``, the injection computed once per solve."""
    u = self.x @ self.u_mat.T

    def f(z):
      self.evaluations += 1  # a Python int increment: noise next to one evaluation
      return torch.tanh(self.scale * (z @ self.w.T) + u)
    return f

  def zeros(self) -> torch.Tensor:
    return torch.zeros(self.x.shape[0], self.w.shape[0], dtype=self.x.dtype)


def first_hits(rel_trace: torch.Tensor, tol: float, offset: int) -> list[int | None]:
  """Per sample, the evaluation count at which its residual first fell below ``tol``.

  Args:
    rel_trace: TorchDEQ's ``(B, N)`` relative-residual trace (column 0 a placeholder).
    tol: the tolerance.
    offset: evaluations made before column 1 was recorded, minus one.

  Returns:
    One count per sample, or None where the trace never reached ``tol``.
  """
  below = (rel_trace[:, 1:] < tol).numpy()
  hits = []
  for row in below:
    where = np.flatnonzero(row)
    hits.append(int(where[0]) + 1 + offset if where.size else None)
  return hits


def load_reference(root: str):
  """The authors' ``lib.solvers`` module, imported with ``root`` first on ``sys.path``.

  Raises:
    RuntimeError: naming what is missing (the reference imports scipy and termcolor
      at module level, though its Broyden uses neither).
  """
  if root not in sys.path:
    sys.path.insert(0, root)
  try:
    return importlib.import_module("lib.solvers")
  except ImportError as error:
    raise RuntimeError(
        f"cannot import lib.solvers from the reference checkout ({error}); it needs "
        "torch, numpy, scipy and termcolor: pass --reference-python with an "
        "interpreter that has them") from error


class TorchDEQSolve:
  """One TorchDEQ forward solve (eval mode, no autograd)."""

  def __init__(self, problem: Problem, solver: str, tol: float, budget: int):
    from torchdeq import get_deq  # pylint: disable=g-import-not-at-top  (side-specific)
    self.problem, self.solver, self.tol = problem, solver, tol
    self.deq = get_deq(core="sliced", f_solver=TORCHDEQ_SOLVER_NAMES[solver],
                       f_max_iter=budget, f_tol=tol, f_stop_mode="rel")
    self.deq.eval()  # the test-time path: one solve, eval_f_max_iter == f_max_iter

  def __call__(self):
    with torch.no_grad():
      z_out, info = self.deq(self.problem.map(), self.problem.zeros())
    return z_out[-1], info

  def report(self, info) -> dict:
    return {"reported_rel_residual": info["rel_lowest"].tolist(),
            "reported_nstep": info["nstep"].tolist(),
            "hit_nfe": first_hits(info["rel_trace"], self.tol, TRACE_OFFSET[self.solver])}


class ReferenceSolve:
  """One forward solve with the authors' Broyden (their layout: ``(B, D, 1)``)."""

  def __init__(self, problem: Problem, solver: str, tol: float, budget: int, root: str):
    if solver != "broyden":
      # The reference's Anderson calls torch.solve, removed from PyTorch in 2.0.
      raise ValueError(f"the reference side runs Broyden only, not {solver!r}")
    self.module = load_reference(root)
    self.problem, self.tol, self.budget = problem, tol, budget

  def __call__(self):
    f = self.problem.map()
    z0 = self.problem.zeros()
    with torch.no_grad():
      out = self.module.broyden(lambda z: f(z[..., 0])[..., None], z0[..., None],
                                threshold=self.budget, eps=self.tol, stop_mode="rel")
    return out["result"][..., 0], out

  def report(self, info) -> dict:
    # One batch-wide residual, no per-sample figures.
    return {"reported_rel_residual": None, "reported_nstep": None, "hit_nfe": None,
            "batch_rel_residual": float(info["lowest"]),
            "protective_break": bool(info["prot_break"])}


def describe(side: str) -> dict:
  versions = f"torch {torch.__version__}"
  if side == "torchdeq":
    import torchdeq  # pylint: disable=g-import-not-at-top
    versions += f", torchdeq {getattr(torchdeq, '__version__', '0.1.0')}"
  return {"device": f"{worker.cpu_description()}, {versions}, "
                    f"{torch.get_num_threads()} threads"}


def serve(side: str, reference_root: str | None, stdin=sys.stdin, stdout=sys.stdout) -> None:
  """Answers JSON-line requests until ``quit`` or end of input."""
  problem = None
  solve: Any = None

  def handle(request: dict) -> dict:
    nonlocal problem, solve
    command = request.get("cmd")
    if command == "info":
      return describe(side)
    if command == "load":
      problem = Problem(request["arrays"])
      return {"batch": int(problem.x.shape[0])}
    if command == "setup":
      args = (problem, request["solver"], request["tol"], request["budget"])
      solve = (TorchDEQSolve(*args) if side == "torchdeq"
               else ReferenceSolve(*args, root=reference_root))
      for _ in range(request.get("warmup", 2)):
        solve()
      return {}
    if command == "time":
      seconds = []
      for _ in range(request["reps"]):
        start = time.perf_counter()
        solve()
        seconds.append(time.perf_counter() - start)
      return {"seconds": seconds}
    if command == "stats":
      problem.evaluations = 0
      z, info = solve()
      return {"evaluations": problem.evaluations, "z": z.tolist(), **solve.report(info)}
    raise worker.unknown_command(request)

  worker.serve_json_lines(handle, stdin, stdout)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="time-to-tolerance worker (PyTorch)")
  parser.add_argument("--side", choices=SIDES, default="torchdeq")
  parser.add_argument("--reference-root", default=None,
                      help="directory holding the reference's lib/solvers.py")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = parser.parse_args(argv)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  if args.side == "reference" and not args.reference_root:
    parser.error("--side reference needs --reference-root")
  serve(args.side, args.reference_root)
  return 0


if __name__ == "__main__":
  sys.exit(main())

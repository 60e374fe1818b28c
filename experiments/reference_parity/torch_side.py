"""The PyTorch half of the parity harness: locuslab/deq's own MDEQ-Vision code.

Run by :mod:`experiments.reference_parity.main` in a Python that has torch (jdeq's
environment need not have it; this file imports neither jax nor jdeq), as

    python torch_side.py parity --reference-dir DEQ --batches B.npz --out R.npz ...
    python torch_side.py train  --reference-dir DEQ --data D.npz --out R.json ...

``--reference-dir`` is a checkout of locuslab/deq (commit 1fb7059 was used); it is
imported as its own scripts import it (``MDEQ-Vision`` as the working directory,
its ``lib`` on the path) and never modified. Its CUDA-only calls are guarded at run
time: ``torch.cuda.synchronize`` and ``torch.cuda.empty_cache`` become no-ops and
``Tensor.cuda`` returns the tensor itself on a machine without CUDA.

``parity`` builds MDEQ-Tiny from the reference yaml (``get_cls_net``: its own
initialization) with the given overrides, saves its initial weights, and runs the
given batches through the reference's training step — ``model(x, train_step=t)``
(the unrolled layers while ``t < PRETRAIN_STEPS``, else Broyden with the backward
hook), cross-entropy, ``backward``, Adam, ``CosineAnnealingLR.step`` — recording
per step the loss, the logits, the gradient norm per part, the parameters after
the update, the forward and backward solver results and the step time.

``train`` runs the reference's own training function (``core.cls_function.train``)
for one "epoch" of exactly the given steps over the given training images, with
the yaml's hyperparameters, then its ``validate`` on the given test images.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

YAML = "experiments/cifar/cls_mdeq_TINY.yaml"
PARTS = (("stem", "downsample."), ("cell", "fullstage."))  # the rest is the head


def load_reference(reference_dir: str):
  """Imports the reference's MDEQ code and config system; returns (models, config)."""
  vision = os.path.join(os.path.abspath(reference_dir), "MDEQ-Vision")
  if not os.path.isfile(os.path.join(vision, "lib", "models", "mdeq.py")):
    raise SystemExit(f"--reference-dir {reference_dir}: no MDEQ-Vision/lib/models/mdeq.py "
                     f"there; give a checkout of locuslab/deq")
  if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
  os.chdir(vision)
  for path in (os.path.join(vision, "lib"), vision):
    sys.path.insert(0, path)
  sys.path.append(os.path.dirname(vision))
  import models  # noqa: F401  (the reference's package: models.mdeq)
  from config import config
  return sys.modules["models.mdeq"], config


def reference_config(config, overrides: list[str]):
  """The TINY yaml with ``KEY VALUE`` overrides (yacs ``merge_from_list``)."""
  config.defrost()
  config.merge_from_file(YAML)
  config.merge_from_list(overrides)
  config.freeze()
  return config


def with_eps(solver, eps: float):
  """The reference solver with another stopping tolerance (its ``eps`` argument)."""
  return functools.partial(solver, eps=eps)


class Recorder:
  """Wraps a reference solver; keeps its last result and the map evaluations it made."""

  def __init__(self, solver):
    self.solver, self.last = solver, None

  def __call__(self, f, x0, *args, **kwargs):
    calls = [0]

    def counted(x):
      calls[0] += 1
      return f(x)

    self.last = self.solver(counted, x0, *args, **kwargs)
    self.last["evaluations"] = calls[0]
    return self.last


def build(mdeq, config, seed: int, eps):
  torch.manual_seed(seed)
  model = mdeq.get_cls_net(config)
  if eps is not None:
    model.f_solver = with_eps(model.f_solver, eps)
    model.b_solver = with_eps(model.b_solver, eps)
  model.f_solver, model.b_solver = Recorder(model.f_solver), Recorder(model.b_solver)
  return model


def arrays(model) -> dict:
  """Every parameter and buffer as numpy copies, by state-dict name.

  (``Tensor.numpy`` shares the tensor's memory, which the optimizer updates in place.)
  """
  return {name: value.detach().cpu().numpy().copy()
          for name, value in model.state_dict().items()
          if not name.endswith("num_batches_tracked")}


def part_of(name: str) -> str:
  return next((part for part, prefix in PARTS if name.startswith(prefix)), "head")


def parity(args) -> None:
  mdeq, config = load_reference(args.reference_dir)
  config = reference_config(config, [
      "MODEL.DROPOUT", "0.0", "TRAIN.PRETRAIN_STEPS", str(args.pretrain_steps),
      "TRAIN.WD", "0.0", "TRAIN.LR", str(args.lr)])
  dtype = torch.float64 if args.float64 else torch.float32
  # Initialized in float32 whatever the precision, so that a float64 run starts
  # from the float32 run's weights (drawn in float64, they would differ).
  model = build(mdeq, config, args.seed, args.eps).to(dtype)
  torch.set_default_dtype(dtype)  # the reference's solvers allocate in the default
  batches = np.load(args.batches)
  images = torch.from_numpy(np.ascontiguousarray(
      batches["images"].transpose(0, 1, 4, 2, 3))).to(dtype)
  labels = torch.from_numpy(batches["labels"].astype(np.int64))
  initial = arrays(model)
  names = [name for name, _ in model.named_parameters()]
  optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=0.0)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.total_steps,
                                                        eta_min=1e-6)
  criterion = nn.CrossEntropyLoss()
  record = {key: [] for key in ("loss", "logits", "grad_stem", "grad_cell", "grad_head",
                                "params", "grads", "fwd_residual", "fwd_nfe", "bwd_residual",
                                "bwd_nfe", "seconds", "lr")}
  model.train()
  for step in range(len(images)):
    start = time.perf_counter()
    model.f_solver.last = model.b_solver.last = None
    logits, _, _ = model(images[step], train_step=schedule._step_count - 1,
                         compute_jac_loss=False)
    loss = criterion(logits, labels[step])
    optimizer.zero_grad()
    loss.backward()
    record["grads"].append(np.concatenate(
        [param.grad.detach().numpy().ravel() for _, param in model.named_parameters()]))
    norms = {part: 0.0 for part in ("stem", "cell", "head")}
    for name, param in model.named_parameters():
      norms[part_of(name)] += float(param.grad.double().pow(2).sum())
    record["lr"].append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    schedule.step()
    record["seconds"].append(time.perf_counter() - start)
    record["loss"].append(loss.item())
    record["logits"].append(logits.detach().numpy())
    for part, total in norms.items():
      record[f"grad_{part}"].append(total ** 0.5)
    state = dict(model.named_parameters())
    record["params"].append(np.concatenate(
        [state[name].detach().numpy().ravel() for name in names]))
    for side, solver in (("fwd", model.f_solver), ("bwd", model.b_solver)):
      result = solver.last
      record[f"{side}_residual"].append(np.nan if result is None else result["lowest"])
      record[f"{side}_nfe"].append(-1 if result is None else result["evaluations"])
    print(f"reference step {step}: loss {loss.item():.6f} ({record['seconds'][-1]:.2f} s)",
          flush=True)
  np.savez(args.out, names=np.array(names), **{f"init/{k}": v for k, v in initial.items()},
           **{k: np.asarray(v) for k, v in record.items()})


#: The reference TINY recipe's share of unrolled steps (3000 of 50 x 390).
PRETRAIN_SHARE = 3000 / 19500
MEAN = np.array((0.4914, 0.4822, 0.4465), np.float32)
STD = np.array((0.2023, 0.1994, 0.2010), np.float32)  # the reference's normalization


def tensors(images: np.ndarray, labels: np.ndarray):
  """uint8 NHWC images normalized as the reference's CIFAR-10 transform does."""
  x = ((images.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
  return torch.utils.data.TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                                        torch.from_numpy(labels.astype(np.int64)))


def calibrated_steps(mdeq, config, dataset, args) -> int:
  """The schedule length that fits the budget, from timed steps of a scratch model.

  ``calibrate`` unrolled and ``calibrate`` equilibrium steps are timed (the first of
  each discarded as warm-up); the steps are ``fill · (60·minutes − overhead) / t``
  with ``t`` the mean step time at the recipe's unrolled share, the rule that sized
  jdeq's ``mdeq_cifar_tiny_20min``.
  """
  model = build(mdeq, config, args.seed + 1, None)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  criterion = nn.CrossEntropyLoss()
  model.train()
  times = {}
  for mode, train_step in (("unrolled", 0), ("equilibrium", 10 ** 9)):
    seconds = []
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size):
      start = time.perf_counter()
      logits, _, _ = model(images, train_step=train_step, compute_jac_loss=False)
      optimizer.zero_grad()
      criterion(logits, labels).backward()
      optimizer.step()
      seconds.append(time.perf_counter() - start)
    times[mode] = float(np.median(seconds[1:]))
  mean = PRETRAIN_SHARE * times["unrolled"] + (1 - PRETRAIN_SHARE) * times["equilibrium"]
  steps = max(1, int(args.fill * (60 * args.minutes - args.overhead) / mean))
  print(f"calibration: unrolled {times['unrolled']:.2f} s, equilibrium "
        f"{times['equilibrium']:.2f} s per step -> {steps} steps", flush=True)
  calibrated_steps.times = times
  return steps


def train(args) -> None:
  """The reference's own loop (``cls_function.train``/``validate``) on given images."""
  mdeq, config = load_reference(args.reference_dir)
  from core import cls_function
  data = np.load(args.data)
  steps, batch = args.steps, args.batch_size
  config = reference_config(config, [
      "PRINT_FREQ", "10", "TRAIN.BATCH_SIZE_PER_GPU", str(batch), "TRAIN.END_EPOCH", "1",
      "GPUS", "(0,)"])
  model = build(mdeq, config, args.seed, None)
  if args.calibrate:
    steps = calibrated_steps(mdeq, config, tensors(data["train_images"][:batch * args.calibrate],
                                                   data["train_labels"][:batch * args.calibrate]),
                             args)
  if not steps:
    raise SystemExit("train: give --steps or --calibrate > 0")
  pretrain = round(PRETRAIN_SHARE * steps)
  config.defrost()
  config.TRAIN.PRETRAIN_STEPS = pretrain
  config.freeze()
  model.pretrain_steps = pretrain  # read from the config when the model was built
  order = np.random.default_rng(args.seed).permutation(len(data["train_images"]))
  order = order[:steps * batch]
  train_set = tensors(data["train_images"][order], data["train_labels"][order])
  test_set = tensors(data["test_images"], data["test_labels"])
  deadline = time.monotonic() + 60 * args.minutes

  class Budgeted(torch.utils.data.DataLoader):
    """Ends the epoch when the wall-clock budget is spent (the last step finishes)."""

    def __iter__(self):
      for index, item in enumerate(super().__iter__()):
        if time.monotonic() > deadline:
          Budgeted.stopped_at = index
          return
        yield item

  Budgeted.stopped_at = None
  loader = Budgeted(train_set, batch_size=batch, shuffle=False)
  from utils.utils import get_optimizer
  optimizer = get_optimizer(config, model)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-6)
  writer = {"writer": None, "train_global_steps": 0, "valid_global_steps": 0}
  import logging
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
  start = time.monotonic()
  cls_function.train(config, loader, model, nn.CrossEntropyLoss(), optimizer, schedule, 0,
                     None, None, writer)
  seconds = time.monotonic() - start
  done = writer["train_global_steps"]
  evaluation = time.monotonic()
  accuracy = cls_function.validate(config, torch.utils.data.DataLoader(test_set, 100),
                                   model, nn.CrossEntropyLoss(), schedule, 0, None, None,
                                   writer)
  report = dict(steps=done, planned_steps=steps, batch_size=batch,
                pretrain_steps=pretrain, train_seconds=seconds,
                calibration_step_seconds=getattr(calibrated_steps, "times", None),
                images_per_s=done * batch / seconds, images_seen=done * batch,
                test_images=len(test_set), test_accuracy=float(accuracy) / 100.0,
                eval_seconds=time.monotonic() - evaluation,
                last_forward_residual=(model.f_solver.last or {}).get("lowest"),
                stopped_by_budget=Budgeted.stopped_at is not None)
  with open(args.out, "w") as handle:
    json.dump(report, handle, indent=1)
  print(json.dumps(report), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  first = commands.add_parser("parity")
  first.add_argument("--batches", required=True)
  first.add_argument("--pretrain-steps", type=int, required=True)
  first.add_argument("--total-steps", type=int, required=True)
  first.add_argument("--lr", type=float, default=1e-3)
  first.add_argument("--eps", type=float, default=None,
                     help="solver stopping tolerance (default: the reference's 1e-3)")
  first.add_argument("--float64", action="store_true",
                     help="run the model in float64 (the initial weights saved before)")
  second = commands.add_parser("train")
  second.add_argument("--data", required=True)
  second.add_argument("--steps", type=int, default=None,
                      help="schedule length (default: calibrated to the budget)")
  second.add_argument("--calibrate", type=int, default=4,
                      help="timed steps per mode that size the schedule (0: --steps)")
  second.add_argument("--fill", type=float, default=0.93)
  second.add_argument("--overhead", type=float, default=60.0)
  second.add_argument("--batch-size", type=int, default=16)
  second.add_argument("--minutes", type=float, required=True)
  for sub in (first, second):
    sub.add_argument("--reference-dir", required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--threads", type=int, default=None)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  args.out = os.path.abspath(args.out)
  for name in ("batches", "data"):
    if getattr(args, name, None):
      setattr(args, name, os.path.abspath(getattr(args, name)))
  (parity if args.command == "parity" else train)(args)


if __name__ == "__main__":
  main()

"""Benchmarks of jdeq: the core step, and every solver × gradient variant next to TorchDEQ.

Entry points:

* ``python -m experiments.bench.core_step`` — the foundation benchmark: one
  Anderson + IFT training step of ``f(z, x) = tanh(Wz + Ux)`` against the time of the
  same number of bare evaluations and VJPs of ``f``.
* ``python -m experiments.bench`` — workloads W1/W2/W3 in jdeq and TorchDEQ, run
  alternately; writes JSON, PNG charts and the README table.
* ``python -m experiments.bench.profile_step`` — where one jdeq training step's
  time goes (XLA profile by solve phase and operation kind).
* ``python -m experiments.bench.op_costs`` — W3's heaviest layer operations
  (convolutions, GroupNorm + ReLU) timed one by one in jdeq and PyTorch, forward and
  VJP: which operations make up a gap between the two sides' map costs.

Modules that the TorchDEQ worker imports (``timing``, ``workloads``, ``torch_side``,
``torch_mdeq``) must not import JAX: that worker runs in its own virtual environment.
"""

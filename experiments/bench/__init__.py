"""The benchmark: every solver × gradient variant of jdeq next to TorchDEQ.

``python -m experiments.bench`` runs workloads W1/W2/W3 in jdeq and TorchDEQ,
alternately, and writes JSON, PNG charts and the README table. Each cell reports the
training step, its forward and backward parts, and the overhead over the same number
of bare map evaluations and VJPs (W1 with Anderson + IFT is the core step of
``f(z, x) = tanh(Wz + Ux)``).

What the investigation of the W2/W3 step times found (profiles, layer operations
timed one by one, every remedy tried) is recorded in ``docs/benchmarks.md``.

Modules that the TorchDEQ worker imports (``timing``, ``workloads``, ``torch_side``,
``torch_mdeq``) must not import JAX: that worker runs in its own virtual environment.
The same holds for ``reference_side``, the worker of the opt-in workload ``w3ref``
that runs the authors' MDEQ code (locuslab/deq) beside jdeq's training steps.
"""

"""``python -m experiments.device_check --out DIR [--quick]``: jdeq on a device, checked.

See :mod:`experiments.device_check.run` for what it runs and writes, and
``docs/gpu.md`` for running it on a GPU machine. Importing this package imports
neither JAX nor the rest of jdeq.
"""

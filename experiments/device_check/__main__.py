"""``python -m experiments.device_check``: see :mod:`experiments.device_check.run`."""

import sys

from experiments.device_check import run

sys.exit(run.main())

"""``python -m experiments.bench``: see :mod:`experiments.bench.run`."""

import sys

from experiments.bench import run

sys.exit(run.main())

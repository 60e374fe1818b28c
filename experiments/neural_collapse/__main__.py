"""``python -m experiments.neural_collapse``: see :mod:`experiments.neural_collapse.main`."""

import sys

from experiments.neural_collapse.main import main

sys.exit(main())

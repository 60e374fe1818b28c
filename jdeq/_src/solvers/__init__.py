"""Fixed-point solvers: each proposes the next iterate; the driver does the rest."""

"""Training parity of jdeq's MDEQ with the authors' code (locuslab/deq, MDEQ-Vision).

``main`` is the step-by-step comparison, ``equal_budget`` the equal-wall-clock
learning comparison, ``transplant`` the weight mapping; ``torch_side`` is the
PyTorch half, run in its own interpreter.
"""

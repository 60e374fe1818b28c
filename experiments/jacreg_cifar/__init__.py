"""Jacobian regularization on MDEQ-Tiny / CIFAR-10 at CPU scale (Tables 2–3 in miniature)."""

"""MOptEqs vs GEQ vs MDEQ-Tiny on CIFAR-10 under one training budget."""

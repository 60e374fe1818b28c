"""Neural collapse in DEQs (papers.md §7): DEQ vs explicit layers on (im)balanced CIFAR."""

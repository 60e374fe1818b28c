"""The JR paper's DEQ-Transformer study at CPU scale (``python -m experiments.jacreg_lm.main``)."""

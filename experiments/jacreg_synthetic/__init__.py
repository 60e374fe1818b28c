"""Jacobian regularization on the 1-D synthetic task of Bai, Koltun & Kolter (2021)."""

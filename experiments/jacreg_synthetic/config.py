"""Settings of the synthetic study of Bai, Koltun & Kolter, "Stabilizing Equilibrium
Models by Jacobian Regularization" (ICML 2021), as one frozen config."""

from __future__ import annotations

from jdeq import config


@config
class SyntheticConfig:
  """The paper's settings, plus the choices it leaves open (marked "ours").

  Attributes:
    num_train, num_val: 4096 / 1000 of 5096 generated pairs.
    x_low, x_high: x ~ Uniform(x_low, x_high) (ours: the range is not stated;
      on [−2, 2] the steep cubic tails make 6-iteration training unstable for
      every γ, seed-dependently, so the fit comparison would measure luck).
    noise_std: δ ~ N(0, noise_std²) (ours: "N(0, 0.05)" read as std 0.05).
    hidden: width of W₁, W₂, U (50 → 200 parameters with b).
    gammas: regularization strengths γ.
    prob: p, probability that a step is regularized.
    forward_iters, backward_iters: training budgets (Broyden forward, IFT with a
      Broyden backward solve; ours: the solver is not stated).
    lr, batch_size, epochs: Adam settings.
    seeds: independent runs per γ (ours: 3).
    probe_iters: budget when measuring iterations to tolerance after training.
    tolerances: relative residuals whose iteration counts are reported.
  """
  num_train: int = 4096
  num_val: int = 1000
  x_low: float = -1.0
  x_high: float = 1.0
  noise_std: float = 0.05
  hidden: int = 50
  gammas: tuple = (0.0, 1.0, 2.0, 4.0)
  prob: float = 0.4
  forward_iters: int = 6
  backward_iters: int = 6
  lr: float = 1e-3
  batch_size: int = 64
  epochs: int = 50
  seeds: tuple = (0, 1, 2)
  probe_iters: int = 50
  tolerances: tuple = (1e-3, 1e-5)

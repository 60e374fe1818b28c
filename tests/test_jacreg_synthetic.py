"""Smoke test of the synthetic Jacobian-regularization study (one epoch)."""

import json

import jax.numpy as jnp
import numpy as np

from experiments.jacreg_synthetic import main as synthetic
from experiments.jacreg_synthetic.config import SyntheticConfig


def test_model_has_200_parameters_and_data_follow_the_paper():
  import jax
  cfg = SyntheticConfig()
  params = synthetic.init_params(cfg, jax.random.PRNGKey(0))
  assert sum(p.size for p in params.values()) == 200
  (x, y), (xv, yv) = synthetic.make_data(cfg, jax.random.PRNGKey(1))
  assert x.shape == (4096, 1) and xv.shape == (1000, 1)
  residual = np.asarray(y - synthetic.target(x))
  assert abs(residual.std() - cfg.noise_std) < 0.005


def test_one_epoch_run_writes_results_and_checks_claims(tmp_path):
  assert synthetic.main(["--epochs", "1", "--seeds", "0", "--out", str(tmp_path)]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert [row["gamma"] for row in results["summary"]] == [0.0, 1.0, 2.0, 4.0]
  assert len(results["claims"]) == 3
  assert all(isinstance(c["holds"], bool) for c in results["claims"])
  for name in ("f_surface.png", "fixed_point_trajectories.png",
               "slope_distribution.png", "runs.csv"):
    assert (tmp_path / name).stat().st_size > 0
  assert np.all(np.isfinite(jnp.array([r["val_mse"] for r in results["runs"]])))

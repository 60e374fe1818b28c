"""The metrics log: JSON lines and the same scalars as TensorBoard events."""

import json

import numpy as np

from jdeq.train import reporting
from tests import helpers


def test_metrics_log_mirrors_scalars_and_a_resume_replaces_the_tail(tmp_path):
  log = reporting.MetricsLog(str(tmp_path / "metrics.jsonl"),
                             tensorboard_dir=str(tmp_path))
  log.write({"kind": "start", "step": 0, "num_params": 10})
  for step in (4, 8, 12):
    log.write({"kind": "train", "step": step, "loss": 1.0 / step, "mode": "unrolled",
               "nonfinite_steps": 0})
  log.write({"kind": "eval", "step": 12, "accuracy": 0.5, "converged": True})
  log.close()
  scalars = helpers.read_event_scalars(tmp_path)
  assert set(scalars) == {"train/loss", "train/nonfinite_steps", "eval/accuracy"}
  assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [1 / 4, 1 / 8, 1 / 12], rtol=1e-6)  # float32 events
  assert scalars["eval/accuracy"] == [(12, 0.5)]

  # A run killed after step 12 and resumed from its checkpoint at step 8.
  resumed = reporting.MetricsLog(str(tmp_path / "metrics.jsonl"), resume_step=8,
                                 tensorboard_dir=str(tmp_path))
  resumed.write({"kind": "train", "step": 12, "loss": 0.05})
  resumed.close()
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["kind"], r["step"]) for r in records] == [
      ("start", 0), ("train", 4), ("train", 8), ("train", 12)]
  scalars = helpers.read_event_scalars(tmp_path)
  assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12]
  assert abs(scalars["train/loss"][-1][1] - 0.05) < 1e-7
  assert scalars["eval/accuracy"] == []  # purged with the rest of the old tail
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2

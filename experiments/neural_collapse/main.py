"""Neural collapse of a DEQ vs explicit layers on balanced and imbalanced CIFAR.

  python -m experiments.neural_collapse --setting cifar10_balanced,cifar10_ka3_r10 \\
      --scale cpu --data-dir DIR [--out runs/neural_collapse] [--arms explicit,deq]

Both arms share the encoder and its features ``H⁰``; the explicit arm applies
``L`` residual blocks with their own weights, the DEQ arm solves for the equilibrium
of one such block (Anderson, relative tolerance 1e-3, at most 20 iterations), and a
linear classifier reads the pooled state ``H`` (``jdeq.models.neural_collapse``).
At evenly spaced points of training (and at step 0) the features of the whole
training subset and of the full test set are extracted and the neural-collapse
metrics (``jdeq.analysis.neural_collapse``) and accuracies (overall, majority,
minority) are recorded. Per setting, ``OUT/<setting>/`` receives ``results.json``,
``curves.csv``, ``curves.png`` (NC1–NC4 and minority collapse over training, both
arms) and ``gram.png`` (cosine Gram matrices of the class means and of ``W``);
``OUT/summary.json`` and ``OUT/summary.md`` hold the final table and which of the
paper's claims hold on these results.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import jdeq.ops

jdeq.ops.tune_cpu_runtime()  # before JAX's first computation

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.neural_collapse import config as nc_config  # noqa: E402
from jdeq import analysis, data, models, nn, train  # noqa: E402
from jdeq.data import augment_numpy, imbalance as imbalance_lib, source  # noqa: E402
from jdeq.models import neural_collapse as _nc_models  # noqa: E402,F401  (registers the arms)
from jdeq.train.testing import in_memory_eval_batches  # noqa: E402

CENTERING = "classes"  # the metrics compared; "samples" is recorded beside it
_SAMPLES_FIELDS = ("nc1", "nc2_means", "nc3")


class Split(NamedTuple):
  """Evaluation-view images (normalized float32, NHWC) and int labels of a split."""
  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class ArmData:
  """What one arm trains and measures on.

  Attributes:
    train_batches: ``() -> iterator`` of training batches ``{"image", "label"}``.
    steps_per_epoch: training batches per epoch.
    train: the training subset in the evaluation view (NC on train features).
    test: the test split (the final measurement, and every one without a probe).
    test_probe: a balanced part of the test split for the measurements during
      training (None: the whole test split every time).
  """
  train_batches: Callable[[], Iterator[Mapping[str, np.ndarray]]]
  steps_per_epoch: int
  train: Split
  test: Split
  test_probe: Optional[Split] = None


def imbalance_of(setting: nc_config.Setting, n_majority: int,
                 seed: int = 0) -> data.Imbalance:
  """The subset of a setting (Fang et al.'s protocol): labels ``0…K_A−1`` keep ``n_A``
  images, the others ``n_A // R``, each class its first images of a shuffle seeded
  by ``seed``."""
  majority = setting.num_classes if setting.balanced else setting.majority_classes
  return data.Imbalance(majority_classes=majority, n_majority=n_majority,
                        ratio=float(setting.ratio), seed=seed)


def load_data(setting: nc_config.Setting, scale: nc_config.Scale,
              data_dir: Optional[str], *, n_majority: Optional[int] = None,
              seed: int = 0) -> ArmData:
  """The training stream (``jdeq.data``, no augmentation), the training subset and the
  full test set of ``setting`` at ``scale``."""
  n_majority = n_majority or scale.n_majority[setting.dataset]
  data_cfg = data.DataConfig(name=setting.dataset, data_dir=data_dir,
                             batch_size=scale.batch_size, augment=False, seed=seed,
                             imbalance=imbalance_of(setting, n_majority, seed))
  spec = data.get_spec(setting.dataset)
  resolved = data.resolve_data_dir(data_dir)

  def split(name: str, keep: Optional[Callable] = None) -> Split:
    images, labels = source.load_in_memory(spec, resolved, name)
    if keep is not None:
      index = keep(labels)
      images, labels = images[index], labels[index]
    return Split(augment_numpy.normalize(images, spec.mean, spec.std),
                 labels.astype(np.int64))

  subset = lambda labels: imbalance_lib.subset_indices(data_cfg.imbalance, labels,
                                                       spec.num_classes)
  test = split(spec.resolve_split("test"))
  probe = None
  if scale.test_probe_per_class:
    index = np.sort(np.concatenate([
        np.flatnonzero(test.labels == c)[:scale.test_probe_per_class]
        for c in range(spec.num_classes)]))
    probe = Split(test.images[index], test.labels[index])
  return ArmData(train_batches=lambda: data.train_batches(data_cfg),
                 steps_per_epoch=data.steps_per_epoch(data_cfg),
                 train=split(spec.train_split, subset), test=test, test_probe=probe)


def _param_breakdown(model: nnx.Module) -> dict[str, int]:
  blocks = model.deq if model.config.arm == "deq" else model.cells
  return {"encoder": nn.num_params(model.encoder), "blocks": nn.num_params(blocks),
          "head": nn.num_params(model.head), "total": nn.num_params(model)}


def measure(forward, params, model_state, split: Split, weight, bias, *,
            setting: nc_config.Setting, batch_size: int) -> dict:
  """Accuracies and NC metrics of one split under the current parameters."""
  stats = []

  def features_and_logits(images):
    h, logits, nstep, residual = forward(params, model_state, images)
    stats.append((np.asarray(nstep), np.asarray(residual)))
    return h, logits

  collected = analysis.extract_features(features_and_logits,
                                        in_memory_eval_batches(split.images, split.labels,
                                                               batch_size))
  features = collected.features.astype(np.float64)
  k = setting.num_classes
  minority = setting.minority_classes
  majority = tuple(c for c in range(k) if c not in minority)
  nc = analysis.neural_collapse(features, collected.labels, weight, bias,
                                num_classes=k, minority_classes=minority,
                                centering=CENTERING).as_dict()
  by_samples = analysis.neural_collapse(features, collected.labels, weight, bias,
                                        num_classes=k, minority_classes=minority,
                                        centering="samples")
  for name in _SAMPLES_FIELDS:
    nc[f"{name}_samples"] = float(getattr(by_samples, name))
  nstep = np.concatenate([s[0] for s in stats])[:len(collected.labels)]
  residual = np.concatenate([s[1] for s in stats])[:len(collected.labels)]
  return dict(accuracy=collected.accuracy(),
              accuracy_majority=collected.accuracy(majority),
              accuracy_minority=(collected.accuracy(minority) if minority
                                 else float("nan")),
              fwd_nfe=float(nstep.mean()), residual=float(residual.mean()), **nc)


def _cosine_gram(rows: np.ndarray) -> np.ndarray:
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  return unit @ unit.T


def run_arm(arm: str, setting: nc_config.Setting, scale: nc_config.Scale,
            arm_data: ArmData, *, seed: int = 0, epochs: Optional[float] = None,
            total_steps: Optional[int] = None, eval_points: Optional[int] = None,
            model_overrides: Optional[Mapping] = None, log: Callable = print) -> dict:
  """Trains one arm and measures NC over training; returns its JSON-able record."""
  wall_start = time.monotonic()
  model_cfg = dataclasses.replace(
      models.get_config(scale.model_name(arm, setting.num_classes)),
      num_classes=setting.num_classes, **dict(model_overrides or {}))
  model = model_cfg.build(rngs=nnx.Rngs(seed))
  params_by_part = _param_breakdown(model)
  kind = "balanced" if setting.balanced else "imbalanced"
  train_cfg = train.TrainConfig(
      optimizer="sgd", lr=scale.lr, momentum=scale.momentum,
      weight_decay=scale.weight_decay, schedule=scale.schedule,
      warmup_steps=scale.warmup_steps, seed=seed,
      epochs=None if total_steps else (epochs or scale.epochs[kind]),
      total_steps=total_steps)
  spe = arm_data.steps_per_epoch
  steps = train_cfg.num_steps(spe)
  optimizer = train.make_optimizer(train_cfg, spe)
  mesh = train.data_mesh()
  state = train.replicate(train.create_train_state(model, optimizer, seed=seed), mesh)
  train_step = train.make_train_step(optimizer, train.JacobianSchedule.from_config(
      train_cfg, spe), unrolled=False, regularized=False, mesh=mesh)
  graphdef = state.graphdef

  @jax.jit
  def forward(params, model_state, images):
    net = nnx.merge(graphdef, params, model_state, copy=True)
    h, aux = net.features(images, train=False)
    return h, net.head(h), aux.stats.nstep, aux.stats.rel_residual

  points = eval_points or scale.eval_points
  measure_at = sorted({round(steps * i / points) for i in range(points + 1)})
  log(f"[{setting.name}/{arm}] {params_by_part['total']:,} parameters "
      f"(encoder {params_by_part['encoder']:,}, blocks {params_by_part['blocks']:,}, "
      f"head {params_by_part['head']:,}); {steps} steps ({steps / spe:.1f} epochs of "
      f"{spe}), NC measured at steps {measure_at}")
  records, train_log = [], []
  batches = arm_data.train_batches()
  interval = None

  def record(step: int) -> None:
    net = state.model()
    weight, bias = (np.asarray(a, np.float64) for a in net.classifier())
    test = (arm_data.test if step == steps or arm_data.test_probe is None
            else arm_data.test_probe)
    for split_name, split in (("train", arm_data.train), ("test", test)):
      row = measure(forward, state.params, state.model_state, split, weight, bias,
                    setting=setting, batch_size=scale.eval_batch_size)
      records.append(dict(step=step, epoch=step / spe, split=split_name,
                          images=len(split.labels), **row))
    train_row, test_row = records[-2], records[-1]
    log(f"[{setting.name}/{arm}] step {step:5d} ep {step / spe:5.1f} | train acc "
        f"{train_row['accuracy']:.4f} test acc {test_row['accuracy']:.4f} "
        f"(maj {test_row['accuracy_majority']:.3f} min "
        f"{test_row['accuracy_minority']:.3f}) | NC1 {train_row['nc1']:.3f} NC2 "
        f"{train_row['nc2']:.3f} NC3 {train_row['nc3']:.3f} NC4 {train_row['nc4']:.3f}"
        f" minority cos {train_row['minority_cos_w']:.3f} | NFE "
        f"{test_row['fwd_nfe']:.1f} | {time.monotonic() - wall_start:.0f} s")

  for step in range(steps + 1):
    if step in measure_at:
      if interval is not None:
        summary = train.metrics.summarize_train(interval)
        train_log.append(dict(step=step, **{k: summary[k] for k in (
            "loss", "accuracy", "fwd_nfe", "residual")}))
        interval = None
      record(step)
    if step == steps:
      break
    state, step_metrics = train_step(state, train.shard_batch(
        {key: value for key, value in next(batches).items()
         if key in ("image", "label")}, mesh))
    interval = train.metrics.accumulate(interval, step_metrics)
  if hasattr(batches, "close"):
    batches.close()

  net = state.model()
  weight, _ = (np.asarray(a, np.float64) for a in net.classifier())
  collected = analysis.extract_features(
      lambda images: forward(state.params, state.model_state, images)[:2],
      in_memory_eval_batches(arm_data.train.images, arm_data.train.labels,
                             scale.eval_batch_size))
  means = np.stack([collected.features[collected.labels == c].mean(0)
                    for c in range(setting.num_classes)]).astype(np.float64)
  centered = means - means.mean(0)
  return dict(
      arm=arm, setting=setting.name, model=dataclasses.asdict(model_cfg) | {
          "solver": repr(model_cfg.solver), "eval_solver": repr(model_cfg.eval_solver),
          "grad": repr(model_cfg.grad)},
      params=params_by_part, train_config=dataclasses.asdict(train_cfg), steps=steps,
      steps_per_epoch=spe, epochs=steps / spe, records=records, train_log=train_log,
      gram_means=_cosine_gram(centered).tolist(),
      gram_w=_cosine_gram(weight).tolist(),
      wall_time_s=time.monotonic() - wall_start)


# ---- reporting ------------------------------------------------------------------------


def final_row(result: dict, split: str) -> dict:
  return [r for r in result["records"] if r["split"] == split][-1]


# (column, split, metric): the final table's columns after setting, arm, size.
TABLE_COLUMNS = (
    ("test acc", "test", "accuracy"), ("test maj", "test", "accuracy_majority"),
    ("test min", "test", "accuracy_minority"), ("train acc", "train", "accuracy"),
    ("NC1", "train", "nc1"), ("NC2 (W)", "train", "nc2"),
    ("NC2 (M)", "train", "nc2_means"), ("NC3", "train", "nc3"), ("NC4", "train", "nc4"),
    ("min cos W", "train", "minority_cos_w"), ("min cos M", "train", "minority_cos_means"),
    ("test NC1", "test", "nc1"), ("test NC4", "test", "nc4"),
)


def table_rows(results: Mapping[str, Mapping[str, dict]]) -> list[dict]:
  rows = []
  for setting_name, arms in results.items():
    for arm, result in arms.items():
      final = {split: final_row(result, split) for split in ("train", "test")}
      row = {"setting": setting_name, "arm": arm, "params": result["params"]["total"],
             "epochs": round(result["epochs"], 2)}
      row.update({name: final[split][metric] for name, split, metric in TABLE_COLUMNS})
      row["wall s"] = round(result["wall_time_s"])
      rows.append(row)
  return rows


def markdown_table(rows: Sequence[dict]) -> str:
  if not rows:
    return ""
  keys = list(rows[0])
  def cell(value):
    if isinstance(value, float):
      return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
  return "\n".join(lines)


def check_claims(results: Mapping[str, Mapping[str, dict]]) -> list[dict]:
  """The paper's three claims, tested on these results (see docs/neural_collapse.md).

  1. Balanced: NC holds for the DEQ as for the explicit net: both arms reach the
     terminal phase (train accuracy >= 0.99) with NC1 down to at most a tenth of
     its step-0 value, NC2 (W) and NC3 below their step-0 values and NC4 <= 0.01,
     and the DEQ's final NC1, NC2 (W) and NC3 are each at most twice the explicit
     net's.
  2. Imbalanced: (a) minority collapse occurs in both arms: the mean cosine among
     the minority rows of W ends at least 0.1 above the ETF value −1/(K−1);
     (b) the DEQ is closer to a simplex ETF (NC2 of W and of the means) and to
     self-duality (NC3) than the explicit net.
  3. Imbalanced: the DEQ is at least as accurate on the test set overall, and its
     gain is larger on the minority than on the majority classes.
  """
  claims = []
  for setting_name, arms in results.items():
    if set(arms) != set(nc_config.ARMS):
      continue
    setting = nc_config.get_setting(setting_name)
    train_rows = {arm: [r for r in res["records"] if r["split"] == "train"]
                  for arm, res in arms.items()}
    first = {arm: rows[0] for arm, rows in train_rows.items()}
    last = {arm: rows[-1] for arm, rows in train_rows.items()}
    test = {arm: final_row(res, "test") for arm, res in arms.items()}

    def add(claim, holds, detail):
      claims.append(dict(setting=setting_name, claim=claim, holds=bool(holds),
                         detail=detail))

    if setting.balanced:
      parts = []
      holds = True
      for arm in nc_config.ARMS:
        f, l = first[arm], last[arm]
        holds &= (l["accuracy"] >= 0.99 and l["nc1"] <= 0.1 * f["nc1"]
                  and l["nc2"] < f["nc2"] and l["nc3"] < f["nc3"] and l["nc4"] <= 0.01)
        parts.append(f"{arm}: train acc {l['accuracy']:.4f}, NC1 {f['nc1']:.3g}→"
                     f"{l['nc1']:.3g}, NC2 {f['nc2']:.3g}→{l['nc2']:.3g}, NC3 "
                     f"{f['nc3']:.3g}→{l['nc3']:.3g}, NC4 {l['nc4']:.3g}")
      holds &= all(last["deq"][m] <= 2 * last["explicit"][m]
                   for m in ("nc1", "nc2", "nc3"))
      add("1: NC holds for the DEQ as for the explicit net (balanced)", holds,
          "; ".join(parts))
      continue
    etf = -1.0 / (setting.num_classes - 1)
    cos = {arm: last[arm]["minority_cos_w"] for arm in nc_config.ARMS}
    add("2a: minority collapse occurs in both arms",
        all(c >= etf + 0.1 for c in cos.values()),
        f"minority cos(W): explicit {cos['explicit']:.3f}, DEQ {cos['deq']:.3f} "
        f"(ETF {etf:.3f})")
    closer = {m: last["deq"][m] < last["explicit"][m]
              for m in ("nc2", "nc2_means", "nc3")}
    add("2b: DEQ closer to a simplex ETF and to self-duality", all(closer.values()),
        ", ".join(f"{m} DEQ {last['deq'][m]:.3f} vs explicit "
                  f"{last['explicit'][m]:.3f}" for m in closer))
    gain = {k: test["deq"][k] - test["explicit"][k]
            for k in ("accuracy", "accuracy_majority", "accuracy_minority")}
    add("3: DEQ at least as accurate, most of all on the minority classes",
        gain["accuracy"] >= 0 and gain["accuracy_minority"] > gain["accuracy_majority"],
        f"DEQ − explicit test accuracy: overall {gain['accuracy']:+.4f}, majority "
        f"{gain['accuracy_majority']:+.4f}, minority {gain['accuracy_minority']:+.4f}")
  return claims


_CURVES = (("nc1", "NC1  tr(Σ_W Σ_B⁺)/K", True), ("nc2", "NC2  ETF error of WWᵀ", False),
           ("nc2_means", "NC2  ETF error of M̃M̃ᵀ", False),
           ("nc3", "NC3  ‖W/‖W‖ − M̃/‖M̃‖‖", False),
           ("nc4", "NC4  classifier ≠ nearest mean", False),
           ("minority_cos_w", "minority collapse: cos among minority w_k", False),
           ("accuracy", "accuracy", False))


def plot_setting(setting: nc_config.Setting, arms: Mapping[str, dict], out: str) -> list:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {"explicit": "tab:blue", "deq": "tab:red"}
  figure, axes = plt.subplots(2, 4, figsize=(20, 8.5))
  for axis, (key, title, log_scale) in zip(axes.flat, _CURVES):
    # W is the same for both splits: its metrics are drawn once.
    splits = ((("train", "-"),) if key in ("nc2", "minority_cos_w")
              else (("train", "-"), ("test", "--")))
    for arm, result in arms.items():
      for split, style in splits:
        rows = [r for r in result["records"] if r["split"] == split]
        axis.plot([r["epoch"] for r in rows], [r[key] for r in rows], style,
                  color=colors.get(arm), marker="o", markersize=3,
                  label=f"{arm} ({split})")
    if key == "minority_cos_w":
      axis.axhline(-1 / (setting.num_classes - 1), color="gray", linestyle=":",
                   label="ETF −1/(K−1)")
    if log_scale:
      axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.legend(fontsize=7)
  table_axis = axes.flat[-1]
  table_axis.axis("off")
  rows = table_rows({setting.name: arms})
  shown = ("arm", "test acc", "test maj", "test min", "train acc", "NC1", "NC2 (W)",
           "NC3", "NC4", "min cos W")
  cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  table = table_axis.table(cellText=[[cell(row[k]) for k in shown[1:]] for row in rows],
                           rowLabels=[row["arm"] for row in rows],
                           colLabels=list(shown[1:]), loc="center")
  table.auto_set_font_size(False)
  table.set_fontsize(7)
  table_axis.set_title("final (train features; accuracies on test)")
  figure.suptitle(f"{setting.name}: neural collapse, explicit vs DEQ")
  figure.tight_layout()
  curves = os.path.join(out, "curves.png")
  figure.savefig(curves, dpi=90)
  plt.close(figure)

  figure, axes = plt.subplots(2, len(arms), figsize=(5 * len(arms), 9.5), squeeze=False)
  for column, (arm, result) in enumerate(arms.items()):
    for row, (key, title) in enumerate((("gram_means", "cos Gram of class means M̃"),
                                        ("gram_w", "cos Gram of W"))):
      image = axes[row, column].imshow(np.asarray(result[key]), vmin=-1, vmax=1,
                                       cmap="RdBu_r")
      axes[row, column].set_title(f"{arm}: {title}")
      figure.colorbar(image, ax=axes[row, column], fraction=0.046)
  figure.suptitle(f"{setting.name}: final Gram matrices (train features)")
  figure.tight_layout()
  gram = os.path.join(out, "gram.png")
  figure.savefig(gram, dpi=90)
  plt.close(figure)
  return [curves, gram]


def write_setting(setting: nc_config.Setting, arms: Mapping[str, dict], out: str,
                  meta: Mapping) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as handle:
    json.dump(dict(meta, setting=setting.name, arms=arms), handle, indent=1,
              default=float)
  fields = None
  with open(os.path.join(out, "curves.csv"), "w", newline="") as handle:
    for arm, result in arms.items():
      for record in result["records"]:
        row = dict(arm=arm, **record)
        if fields is None:
          fields = list(row)
          writer = csv.DictWriter(handle, fieldnames=fields)
          writer.writeheader()
        writer.writerow(row)
  plot_setting(setting, arms, out)


def write_summary(results: Mapping[str, Mapping[str, dict]], out: str,
                  meta: Mapping) -> str:
  rows = table_rows(results)
  claims = check_claims(results)
  with open(os.path.join(out, "summary.json"), "w") as handle:
    json.dump(dict(meta, table=rows, claims=claims), handle, indent=1, default=float)
  lines = ["Final table (NC metrics on the training features, class-mean centering; "
           "accuracies on the full test set):", "", markdown_table(rows), "",
           "The paper's claims on these results:", ""]
  for claim in claims:
    lines.append(f"- [{claim['setting']}] claim {claim['claim']}: "
                 f"{'HOLDS' if claim['holds'] else 'does not hold'} ({claim['detail']})")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "summary.md"), "w") as handle:
    handle.write(text)
  return text


def _load_previous(out: str, setting_name: str) -> dict:
  path = os.path.join(out, setting_name, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as handle:
    return json.load(handle).get("arms", {})


def _parser() -> argparse.ArgumentParser:
  grid = "\n".join(f"  {name}" for name in nc_config.GRID)
  parser = argparse.ArgumentParser(
      prog="python -m experiments.neural_collapse",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=(f"settings of the grid (--setting, comma-separated):\n{grid}\n\n"
              f"scales (--scale): " + "; ".join(
                  f"{s.name}: model {s.model}, n_A {s.n_majority}, epochs {s.epochs}, "
                  f"lr {s.lr} ({s.schedule})" for s in nc_config.SCALES.values())))
  parser.add_argument("--setting", default="cifar10_balanced,cifar10_ka3_r10",
                      help="comma-separated grid entries (listed below)")
  parser.add_argument("--scale", default="cpu", choices=list(nc_config.SCALES))
  parser.add_argument("--arms", default=",".join(nc_config.ARMS),
                      help=f"comma-separated subset of {list(nc_config.ARMS)}")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR)")
  parser.add_argument("--out", default=os.path.join("runs", "neural_collapse"))
  parser.add_argument("--epochs", type=float, default=None,
                      help="override the scale's training epochs")
  parser.add_argument("--n-majority", type=int, default=None,
                      help="override the scale's n_A")
  parser.add_argument("--eval-points", type=int, default=None,
                      help="NC measurements over training (besides step 0)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--report", action="store_true",
                      help="train nothing: rebuild the plots and the summary of OUT")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  names = [name.strip() for name in args.setting.split(",") if name.strip()]
  arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
  try:
    settings = [nc_config.get_setting(name) for name in names]
  except ValueError as error:
    parser.error(str(error))
  unknown_arms = sorted(set(arms) - set(nc_config.ARMS))
  if unknown_arms or not arms:
    parser.error(f"unknown arms {unknown_arms}; valid arms: {list(nc_config.ARMS)}")
  scale = nc_config.get_scale(args.scale)
  meta = dict(scale=dataclasses.asdict(scale), seed=args.seed, centering=CENTERING,
              devices=[str(d) for d in jax.devices()])
  results = {}
  for setting in [] if args.report else settings:
    arm_data = load_data(setting, scale, args.data_dir, n_majority=args.n_majority,
                         seed=args.seed)
    counts = np.bincount(arm_data.train.labels, minlength=setting.num_classes)
    print(f"== {setting.name}: {len(arm_data.train.labels)} training images "
          f"(per class {counts.tolist()}), {len(arm_data.test.labels)} test images",
          flush=True)
    arm_results = _load_previous(args.out, setting.name)
    for arm in arms:
      arm_results[arm] = run_arm(arm, setting, scale, arm_data, seed=args.seed,
                                 epochs=args.epochs, eval_points=args.eval_points,
                                 log=lambda text: print(text, flush=True))
      print(f"[{setting.name}/{arm}] wall time {arm_results[arm]['wall_time_s']:.0f} s",
            flush=True)
      write_setting(setting, arm_results, os.path.join(args.out, setting.name),
                    dict(meta, train_counts=counts.tolist()))
    results[setting.name] = arm_results
  for name in os.listdir(args.out) if os.path.isdir(args.out) else ():
    if name not in results and name in nc_config.GRID:
      previous = _load_previous(args.out, name)
      if previous:
        results[name] = previous
        if args.report:
          plot_setting(nc_config.get_setting(name), previous,
                       os.path.join(args.out, name))
  if not results:
    parser.error(f"no results in {args.out!r}")
  print(write_summary(dict(sorted(results.items())), args.out, meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())

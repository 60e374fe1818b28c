"""The neural-collapse study's classifiers: one encoder, explicit blocks or a DEQ, a linear head.

Both arms share the architecture up to the features ``H⁰`` (papers.md §7)::

  images → encoder → x = H⁰ (B, h, w, C) ─┬─ explicit: z_l = f_l(z_{l−1}, x), l = 1…L, z_0 = 0
                                          └─ DEQ:      z* = f(z*, x)  (one block f)
         → H = mean_{h,w} z  (B, C) → logits = H Wᵀ + b

The block is :class:`jdeq.models.cells.ConvCell`,
``f(z, x) = GN(ReLU(z + GN(x + conv₂(ReLU(GN(conv₁ z))))))``; the explicit arm applies
``L`` copies with their own weights from the DEQ's starting point ``z_0 = 0``, so it is
the DEQ unrolled for ``L`` steps with untied weights. The encoder is a ResNet: a
3×3 conv–BN–ReLU stem (optionally strided), stages of BasicBlocks (conv–BN–ReLU–conv–BN
plus the identity or a strided 1×1 projection), and a strided 3×3 conv–BN transition
to the block's ``C`` channels. With ``encoder_widths=(64, 128, 256)``, two blocks per
stage, ``C = 512`` and ``L = 2``, encoder plus explicit arm have ResNet-18's layout
and size (the transition and the two blocks standing for its layer 4).

``features_and_logits(images)`` returns ``(H, logits)`` for the neural-collapse
metrics; the classifier weight ``W`` is ``head.kernel.T``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import jdeq
from jdeq import nn
from jdeq.models.cells import ConvCell
from jdeq.models.registry import ModelConfig, register

ARMS = ("explicit", "deq")


def _default_solver() -> jdeq.AbstractSolver:
  return jdeq.Anderson(max_iter=20, tol=1e-3, stop_mode="rel", m=5)


def _default_grad():
  return jdeq.IFT(jdeq.Anderson(max_iter=20, tol=1e-3, stop_mode="rel", m=5))


@jdeq.config
class NCClassifierConfig(ModelConfig):
  """Encoder → explicit blocks or DEQ → linear classifier (see the module docstring).

  Attributes:
    arm: ``"explicit"`` or ``"deq"``.
    image_shape: ``(H, W, C)`` of the inputs.
    num_classes: ``K``.
    stem_width: channels of the stem.
    stem_stride: stride of the stem (1 as ResNet-18 on CIFAR; 2 halves every map).
    encoder_widths: channels of the encoder stages; every stage after the first
      starts with a stride-2 BasicBlock.
    encoder_blocks: BasicBlocks per stage.
    channels: ``C``, channels of the block (and the feature dimension ``D``); the
      transition into it has stride 2.
    inner_channels: hidden channels of the block.
    num_groups: GroupNorm groups of the block.
    depth: ``L``, explicit blocks.
    solver, eval_solver, grad, unrolled_steps: the DEQ arm's solve (papers.md §7:
      tolerance 1e-3, at most 20 iterations).
  """
  arm: str = "deq"
  image_shape: tuple = (32, 32, 3)
  num_classes: int = 10
  stem_width: int = 16
  stem_stride: int = 1
  encoder_widths: tuple = (16, 32)
  encoder_blocks: tuple = (1, 1)
  channels: int = 64
  inner_channels: int = 64
  num_groups: int = 8
  depth: int = 2
  solver: jdeq.AbstractSolver = dataclasses.field(default_factory=_default_solver)
  eval_solver: jdeq.AbstractSolver = dataclasses.field(default_factory=_default_solver)
  grad: jdeq.GradientMode = dataclasses.field(default_factory=_default_grad)
  unrolled_steps: int = 10

  def __post_init__(self) -> None:
    name = type(self).__name__
    for field in ("image_shape", "encoder_widths", "encoder_blocks"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    if self.arm not in ARMS:
      raise ValueError(f"{name}: arm must be one of {ARMS}, got {self.arm!r}")
    if len(self.image_shape) != 3:
      raise ValueError(f"{name}: image_shape must be (H, W, C), got {self.image_shape}")
    if len(self.encoder_widths) != len(self.encoder_blocks) or not self.encoder_widths:
      raise ValueError(f"{name}: encoder_widths {self.encoder_widths} and "
                       f"encoder_blocks {self.encoder_blocks} need one entry per stage")
    positive = dict(num_classes=self.num_classes, stem_width=self.stem_width,
                    channels=self.channels, inner_channels=self.inner_channels,
                    num_groups=self.num_groups, depth=self.depth,
                    unrolled_steps=self.unrolled_steps)
    for key, value in positive.items():
      if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
    if any(w <= 0 for w in self.encoder_widths) or any(b < 0 for b in
                                                       self.encoder_blocks):
      raise ValueError(f"{name}: encoder widths must be > 0 and block counts >= 0")
    if self.stem_stride not in (1, 2):
      raise ValueError(f"{name}: stem_stride must be 1 or 2, got {self.stem_stride!r}")
    for channels in (self.channels, self.inner_channels):
      if channels % self.num_groups:
        raise ValueError(f"{name}: num_groups={self.num_groups} must divide "
                         f"{channels} channels")

  @property
  def state_shape(self) -> tuple[int, int, int]:
    """``(h, w, C)`` of ``H⁰`` and of the block's state."""
    height, width = self.image_shape[:2]
    downsample = self.stem_stride * 2 ** len(self.encoder_widths)
    return (-(-height // downsample), -(-width // downsample), self.channels)

  def build(self, *, rngs: nnx.Rngs) -> "NCClassifier":
    return NCClassifier(self, rngs=rngs)


class BasicBlock(nnx.Module):
  """ResNet's BasicBlock: ``ReLU(BN(conv(ReLU(BN(conv x)))) + shortcut(x))``."""

  def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nn.Conv(in_channels, channels, (3, 3), strides=stride, use_bias=False,
                         rngs=rngs)
    self.norm1 = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.conv2 = nn.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.project = stride != 1 or in_channels != channels
    if self.project:
      self.shortcut = nn.Conv(in_channels, channels, (1, 1), strides=stride,
                              use_bias=False, rngs=rngs)
      self.shortcut_norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5,
                                         rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    frozen = not train
    y = jax.nn.relu(self.norm1(self.conv1(x), use_running_average=frozen))
    y = self.norm2(self.conv2(y), use_running_average=frozen)
    skip = x if not self.project else self.shortcut_norm(
        self.shortcut(x), use_running_average=frozen)
    return jax.nn.relu(y + skip)


class Encoder(nnx.Module):
  """Stem, BasicBlock stages and a stride-2 transition to ``channels`` (gives ``H⁰``)."""

  def __init__(self, cfg: NCClassifierConfig, *, rngs: nnx.Rngs):
    self.stem = nn.Conv(cfg.image_shape[-1], cfg.stem_width, (3, 3),
                        strides=cfg.stem_stride, use_bias=False, rngs=rngs)
    self.stem_norm = nnx.BatchNorm(cfg.stem_width, momentum=0.9, epsilon=1e-5,
                                   rngs=rngs)
    blocks, width = [], cfg.stem_width
    for stage, (out, count) in enumerate(zip(cfg.encoder_widths, cfg.encoder_blocks)):
      stride = 1 if stage == 0 else 2
      if count == 0:
        continue
      for index in range(count):
        blocks.append(BasicBlock(width, out, stride if index == 0 else 1, rngs=rngs))
        width = out
    self.blocks = nnx.List(blocks)
    # Stages with no block still downsample: fold their strides into the transition.
    skipped = sum(1 for stage, count in enumerate(cfg.encoder_blocks)
                  if count == 0 and stage > 0)
    self.transition = nn.Conv(width, cfg.channels, (3, 3), strides=2 * 2 ** skipped,
                              use_bias=False, rngs=rngs)
    self.transition_norm = nnx.BatchNorm(cfg.channels, momentum=0.9, epsilon=1e-5,
                                         rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    frozen = not train
    x = jax.nn.relu(self.stem_norm(self.stem(images), use_running_average=frozen))
    for block in self.blocks:
      x = block(x, train=train)
    return self.transition_norm(self.transition(x), use_running_average=frozen)


def _explicit_stats(batch: int, depth: int, dtype) -> jdeq.SolverStats:
  """SolverStats of an explicit stack: ``depth`` block applications, no residual."""
  zeros = jnp.zeros((batch,), dtype)
  return jdeq.SolverStats(nstep=jnp.full((batch,), depth, jnp.int32),
                          abs_residual=zeros, rel_residual=zeros,
                          converged=jnp.ones((batch,), bool),
                          diverged=jnp.zeros((batch,), bool),
                          trace=jnp.zeros((batch, 0), dtype))


class NCClassifier(nnx.Module):
  """The study's classifier, following the model call contract of jdeq classifiers:
  ``model(images, train=, unrolled=, budget=, jac_probes=) -> (logits, DEQAux)``.

  The explicit arm ignores ``unrolled``, ``budget`` and ``jac_probes`` (its aux reports
  ``depth`` block evaluations, residual 0 and a zero Jacobian term).
  """

  def __init__(self, cfg: NCClassifierConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)

    def block():
      return ConvCell(cfg.channels, cfg.inner_channels, num_groups=cfg.num_groups,
                      rngs=rngs)

    if cfg.arm == "deq":
      self.deq = nn.DEQ(block(), solver=cfg.solver, eval_solver=cfg.eval_solver,
                        grad=cfg.grad, unrolled_steps=cfg.unrolled_steps)
    else:
      cells = [block() for _ in range(cfg.depth)]
      self.cells = nnx.List(cells)
    self.head = nnx.Linear(cfg.channels, cfg.num_classes, rngs=rngs)
    self.rngs = rngs

  def features(self, images: jax.Array, *, train: bool = False, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, nn.DEQAux]:
    """``H``, the classifier's input ``(B, C)``, and the aux outputs."""
    expected = tuple(self.config.image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"NCClassifier expects images of shape (B, "
                       f"{', '.join(map(str, expected))}), got {images.shape}")
    x = self.encoder(images, train=train)
    if self.config.arm == "deq":
      z, aux = self.deq.call_with_rngs(x, self.rngs, train=train, unrolled=unrolled,
                                       budget=budget, jac_probes=jac_probes,
                                       uses_dropout=False)
    else:
      z = jnp.zeros_like(x)
      for cell in self.cells:
        z = cell(z, x, cell.prepare(x, train=train, key=None))
      batch = x.shape[0]
      aux = nn.DEQAux(_explicit_stats(batch, self.config.depth, x.dtype),
                      jnp.zeros((batch,), jnp.float32))
    return jnp.mean(z, axis=(1, 2)), aux

  def __call__(self, images: jax.Array, train: bool = True, unrolled: bool = False,
               budget: Optional[jax.Array] = None,
               jac_probes: int = 0) -> tuple[jax.Array, nn.DEQAux]:
    h, aux = self.features(images, train=train, unrolled=unrolled, budget=budget,
                           jac_probes=jac_probes)
    return self.head(h), aux

  def features_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Evaluation mode: ``(H, logits)`` for :func:`jdeq.analysis.extract_features`."""
    h, _ = self.features(images, train=False)
    return h, self.head(h)

  def classifier(self) -> tuple[jax.Array, jax.Array]:
    """``(W, b)`` with ``W`` of shape ``(K, C)`` (``logits = H Wᵀ + b``)."""
    return self.head.kernel.value.T, self.head.bias.value


# The CPU-scale arms of the study, and ResNet-18-layout arms for the paper's grid.
_CPU = dict(stem_width=16, stem_stride=2, encoder_widths=(16, 32), encoder_blocks=(1, 1),
            channels=64, inner_channels=64, num_groups=8, depth=2)
# inner_channels=384 gives the explicit arm ResNet-18's size (11.2M parameters): its
# layer 4 has three 512→512 convolutions and one 256→512, the transition plus two
# blocks here one 256→512 and four 512↔384.
_RESNET18 = dict(stem_width=64, stem_stride=1, encoder_widths=(64, 128, 256),
                 encoder_blocks=(2, 2, 2), channels=512, inner_channels=384,
                 num_groups=32, depth=2)

for _arm in ARMS:
  register(f"nc_{_arm}_cifar_cpu", NCClassifierConfig(arm=_arm, **_CPU))
  for _classes in (10, 100):
    register(f"nc_{_arm}_resnet18_cifar{_classes}",
             NCClassifierConfig(arm=_arm, num_classes=_classes, **_RESNET18))


def final_linear_features(model: nnx.Module):
  """``images -> (H, logits)`` for any jdeq classifier whose logits are the output of
  an ``nnx.Linear`` (every classification model of :mod:`jdeq.models`).

  ``H`` is the input of the last ``nnx.Linear`` the model applies in evaluation mode
  (``model(images, train=False)``), recorded while the forward pass is traced; the
  returned function is jitted over a snapshot of the model's current state (call
  this again after training). For :func:`jdeq.analysis.extract_features`.

  Raises:
    ValueError: the forward pass applies no ``nnx.Linear``, or the last one's output
      is not the logits.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    net = nnx.merge(graphdef, state, copy=True)
    calls = []
    original = nnx.Linear.__call__

    def recording(self, inputs, *args, **kwargs):
      outputs = original(self, inputs, *args, **kwargs)
      calls.append((inputs, outputs))
      return outputs

    nnx.Linear.__call__ = recording
    try:
      logits, _ = net(images, train=False)
    finally:
      nnx.Linear.__call__ = original
    if not calls or calls[-1][1] is not logits:
      raise ValueError(f"final_linear_features: the logits of {type(model).__name__} "
                       "are not the output of its last nnx.Linear")
    return calls[-1][0], logits

  return lambda images: forward(state, images)

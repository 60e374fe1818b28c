"""Shared test helpers: small DEQ problems and independent derivative oracles."""

from __future__ import annotations

import pathlib
import struct
from typing import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def relative_error(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ over all leaves of two pytrees."""
  a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(actual)])
  e = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(expected)])
  return float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e))


def cosine_similarity(a, b) -> float:
  a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
  b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(b)])
  return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def central_difference_gradient(loss: Callable, params, eps: float = 1e-6):
  """Full gradient of a scalar ``loss(params)`` by central differences (float64)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  loss_flat = jax.jit(lambda p: loss(unravel(p)))
  basis = np.eye(flat.size, dtype=np.float64)
  grads = [(loss_flat(flat + eps * e) - loss_flat(flat - eps * e)) / (2 * eps)
           for e in basis]
  return unravel(jnp.asarray(grads))


def directional_difference(loss: Callable, params, direction, eps: float = 1e-6):
  """Central difference of ``loss`` along ``direction`` (same pytree as params)."""
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  return (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)


def random_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                for k, x in zip(keys, leaves)])


def tanh_problem(key, dim: int = 32, batch: int = 8, contraction: float = 0.9,
                 dtype=jnp.float64):
  """A contractive ``f(z, W, U, x) = tanh(W z + U x)`` with ``‖W‖₂ = contraction``.

  Returns ``(f, params, x)`` where ``params = (W, U)``.
  """
  k_w, k_u, k_x = jax.random.split(key, 3)
  w = jax.random.normal(k_w, (dim, dim), dtype)
  w = contraction * w / jnp.linalg.norm(w, ord=2)
  u = jax.random.normal(k_u, (dim, dim), dtype) / jnp.sqrt(dim)
  x = jax.random.normal(k_x, (batch, dim), dtype)

  def f(z, params, x):
    w, u = params
    return jnp.tanh(z @ w.T + x @ u.T)

  return f, (w, u), x


def two_resolution_problem(key, batch: int = 4, dtype=jnp.float64):
  """A pytree state ``[fine (B,8,2), coarse (B,4,3)]`` coupled by linear maps.

  ``fine ← tanh(A fine + P coarse + x)``, ``coarse ← tanh(B coarse + R fine)``,
  scaled to be contractive. Returns ``(f, params, x, z0)``.
  """
  ks = jax.random.split(key, 5)
  n_fine, n_coarse = 16, 12
  def scaled(k, shape, norm):
    m = jax.random.normal(k, shape, dtype)
    return norm * m / jnp.linalg.norm(m, ord=2)
  params = dict(a=scaled(ks[0], (n_fine, n_fine), 0.5),
                p=scaled(ks[1], (n_fine, n_coarse), 0.3),
                b=scaled(ks[2], (n_coarse, n_coarse), 0.5),
                r=scaled(ks[3], (n_coarse, n_fine), 0.3))
  x = jax.random.normal(ks[4], (batch, 8, 2), dtype)

  def f(z, params, x):
    fine, coarse = z
    fine_flat, coarse_flat = fine.reshape(batch, -1), coarse.reshape(batch, -1)
    new_fine = jnp.tanh(fine_flat @ params["a"].T + coarse_flat @ params["p"].T
                        + x.reshape(batch, -1))
    new_coarse = jnp.tanh(coarse_flat @ params["b"].T + fine_flat @ params["r"].T)
    return [new_fine.reshape(fine.shape), new_coarse.reshape(coarse.shape)]

  z0 = [jnp.zeros((batch, 8, 2), dtype), jnp.zeros((batch, 4, 3), dtype)]
  return f, params, x, z0


def read_event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
  """The scalars of every TensorBoard event file in ``directory``: tag -> [(step, v)].

  Reads the TFRecord framing directly (length u64, its CRC u32, payload, payload
  CRC u32; CRCs not checked) and parses each payload with tensorboardX's ``Event``
  protobuf, so neither TensorFlow nor TensorBoard is needed. A session START
  event at step ``s > 0`` (how a writer's ``purge_step`` marks a resumed run)
  drops the earlier points at steps ``>= s``, as TensorBoard hides them.
  """
  # Imported here: the helpers of the core tests must not need tensorboardX.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      if (event.HasField("session_log") and event.step > 0
          and event.session_log.status == event_pb2.SessionLog.START):
        for tag, points in scalars.items():
          scalars[tag] = [p for p in points if p[0] < event.step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars

"""Jacobian diagnostics and penalties at an equilibrium."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdeq._src import batched_tree

PyTree = Any


def jacobian_fro_sq(f: Callable[..., PyTree], z_star: PyTree, *args: PyTree,
                    key: jax.Array, num_probes: int = 1) -> jax.Array:
  """Hutchinson estimate of ``‖J_f(z*)‖²_F / d`` per sample.

  With ``ε ~ N(0, I)``, ``E‖εᵀJ‖² = tr(J Jᵀ) = ‖J‖²_F``, so

    ‖J‖²_F / d ≈ (1 / (M d)) Σₘ ‖εₘᵀ J‖²,

  one vector-Jacobian product per probe (Bai et al., 2021). The result is
  differentiable with respect to ``args`` (and ``z_star``), for use as a penalty.

  Args:
    f: the map ``f(z, *args)``.
    z_star: the point, a batched pytree.
    *args: the map's other arguments.
    key: PRNG key for the probes.
    num_probes: ``M``.

  Returns:
    Array ``(B,)``: the unbiased estimate for each sample, divided by the per-sample
    dimension ``d``.
  """
  if not (isinstance(num_probes, int) and num_probes >= 1):
    raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
  layout = batched_tree.layout_of(z_star, "z_star")
  _, vjp = jax.vjp(lambda z: f(z, *args), z_star)
  probes = jax.random.normal(
      key, (num_probes, layout.batch_size, layout.dim), layout.dtype)

  def squared_norm(probe):
    (row,) = vjp(batched_tree.unflatten(probe, layout))
    return jnp.sum(jnp.square(batched_tree.flatten(row, layout)), axis=1)

  return jnp.mean(jax.vmap(squared_norm)(probes), axis=0) / layout.dim


def spectral_radius(f: Callable[..., PyTree], z_star: PyTree, *args: PyTree,
                    key: jax.Array, iters: int = 100) -> jax.Array:
  """Power-iteration estimate of the spectral radius of ``J_f(z*)`` per sample.

  Iterates ``v ← Jᵀv / ‖Jᵀv‖`` with vector-Jacobian products (``Jᵀ`` has the
  spectrum of ``J``, and reverse-mode products are the ones every DEQ model makes
  fast). Since ``‖(Jᵀ)ᵏ v‖^{1/k} → ρ(J)`` also when the dominant eigenvalues are a
  complex pair (where one growth factor alone oscillates), the estimate is the
  geometric mean of the growth factors over the second half of the iterations.
  Not differentiated.

  Returns:
    Array ``(B,)``.
  """
  if not (isinstance(iters, int) and iters >= 2):
    raise ValueError(f"iters must be an integer >= 2, got {iters!r}")
  z_star, args = jax.lax.stop_gradient((z_star, args))
  layout = batched_tree.layout_of(z_star, "z_star")
  _, vjp = jax.vjp(lambda z: f(z, *args), z_star)
  tiny = jnp.finfo(layout.dtype).tiny

  def step(v, _):
    (w,) = vjp(batched_tree.unflatten(v, layout))
    w = batched_tree.flatten(w, layout)
    growth = batched_tree.per_sample_norm(w)
    return w / (growth[:, None] + tiny), jnp.log(growth + tiny)

  v0 = jax.random.normal(key, (layout.batch_size, layout.dim), layout.dtype)
  v0 = v0 / batched_tree.per_sample_norm(v0)[:, None]
  _, log_growth = jax.lax.scan(step, v0, None, length=iters)
  return jnp.exp(jnp.mean(log_growth[iters // 2:], axis=0))

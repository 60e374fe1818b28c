"""Batched solves of tiny symmetric positive definite systems.

Anderson mixing solves one ``m × m`` system per sample and iteration with ``m``
around 5. LAPACK calls through XLA cost far more than the arithmetic at this size,
so the Cholesky factorization is written out for the static ``m``; XLA fuses it
into a few elementwise kernels over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def solve_spd(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves ``matrix @ x = rhs`` by an unrolled Cholesky factorization.

  Args:
    matrix: ``(B, m, m)`` symmetric positive definite matrices (small static ``m``).
    rhs: ``(B, m)`` right-hand sides.

  Returns:
    ``(B, m)`` solutions; non-finite where a matrix is not positive definite, which
    the caller detects.
  """
  m = matrix.shape[-1]
  lower = [[None] * m for _ in range(m)]
  for j in range(m):
    diagonal = matrix[:, j, j] - sum(lower[j][k] ** 2 for k in range(j))
    lower[j][j] = jnp.sqrt(diagonal)
    for i in range(j + 1, m):
      off = matrix[:, i, j] - sum(lower[i][k] * lower[j][k] for k in range(j))
      lower[i][j] = off / lower[j][j]
  forward = [None] * m
  for i in range(m):
    forward[i] = (rhs[:, i] - sum(lower[i][k] * forward[k] for k in range(i))
                  ) / lower[i][i]
  solution = [None] * m
  for i in reversed(range(m)):
    solution[i] = (forward[i] - sum(lower[k][i] * solution[k]
                                    for k in range(i + 1, m))) / lower[i][i]
  return jnp.stack(solution, axis=1)

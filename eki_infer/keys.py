"""Per-chain random keys, folded in one compiled call.

Chain c draws from ``fold_in(rng_key, c)`` and its n-th step from ``fold_in(chain_key,
n)``: results depend only on ``(rng_key, c, n)``, so they do not change with the number
of chains, and checkpoints need no RNG state. Both functions are jitted once; an eager
``vmap`` over a fresh lambda would be re-traced at every step of every run.
"""

from __future__ import annotations

import jax

__all__ = ["chain_keys", "fold_keys"]


@jax.jit
def chain_keys(rng_key, chain_ids):
    """``fold_in(rng_key, c)`` for each chain id c."""
    return jax.vmap(lambda c: jax.random.fold_in(rng_key, c))(chain_ids)


@jax.jit
def fold_keys(keys, n):
    """``fold_in(k, n)`` for each key k: every chain's key for step n."""
    return jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)

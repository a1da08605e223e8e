"""Per-chain random keys, folded in one compiled call.

Chain c draws from ``fold_in(rng_key, c)`` and its n-th step from ``fold_in(chain_key,
n)``: results depend only on ``(rng_key, c, n)``, so they do not change with the number
of chains, and checkpoints need no RNG state. Both functions are jitted once; an eager
``vmap`` over a fresh lambda would be re-traced at every step of every run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RESERVED_KEY_INDEX", "chain_keys", "check_rng_key", "fold_keys"]

#: ``fold_in`` indices of a chain key from this one on are not step numbers (the final
#: draws, the predictive noise), so a run takes fewer steps than this
RESERVED_KEY_INDEX = 2**30


def check_rng_key(rng_key) -> None:
    """Raises a TypeError naming ``rng_key`` unless it is one JAX PRNG key: a typed key
    of shape () (``jax.random.key``) or a raw uint32 key of shape (2,)
    (``jax.random.PRNGKey``). Checked before the model is traced, so that a seed passed
    as an int or a batch of keys is caught at once, not deep inside a compiled step."""
    shape = getattr(rng_key, "shape", None)
    dtype = getattr(rng_key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype is not None and not typed and np.dtype(dtype) == np.uint32
    if (typed and shape == ()) or (raw and len(shape) == 1):  # (2,), or (4,) for "rbg"
        return
    what = f"{type(rng_key).__name__}" + (f" of shape {shape}, dtype {dtype}" if shape else "")
    raise TypeError(
        f"rng_key must be one JAX PRNG key, e.g. jax.random.PRNGKey(0) or "
        f"jax.random.key(0); got {what}. (Chains get their own keys from it.)"
    )


@jax.jit
def chain_keys(rng_key, chain_ids):
    """``fold_in(rng_key, c)`` for each chain id c."""
    return jax.vmap(lambda c: jax.random.fold_in(rng_key, c))(chain_ids)


@jax.jit
def fold_keys(keys, n):
    """``fold_in(k, n)`` for each key k: every chain's key for step n."""
    return jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)

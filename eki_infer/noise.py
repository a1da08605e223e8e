"""Observation-noise covariances Γ that whiten, solve and give log-determinants cheaply.

Every ensemble Kalman update in eki_infer is computed in *whitened* output space: a
residual r ∈ R^M is mapped to W r with Wᵀ W = Γ⁻¹, after which the noise is the identity
and all updates reduce to J × J solves. A noise object therefore has one main job,
``whiten``; it also draws N(0, Γ) noise (``sample``), solves Γ x = r (``solve``) and gives
log det Γ, each without forming a dense M × M matrix unless Γ itself is dense.

Four structures cover NumPyro's Gaussian likelihoods:

- :class:`ScalarNoise` — Γ = σ² I (``Normal`` with a scalar scale),
- :class:`DiagonalNoise` — Γ = diag(σ²) (``Normal`` with an array scale),
- :class:`DenseNoise` — any SPD Γ, stored by its Cholesky factor (``MultivariateNormal``),
- :class:`LowRankNoise` — Γ = F Fᵀ + diag(D) (``LowRankMultivariateNormal``), whitened in
  O(M r) through the thin SVD of D^{-1/2} F,

:class:`EventBlocksNoise` holds a plate of dense or low-rank events (one block per
event, never the whole block-diagonal matrix), and :class:`BlockNoise` stacks them
block-diagonally when a model has several observed sites (:func:`block_diagonal`
collapses all-diagonal blocks into one :class:`DiagonalNoise`). All classes are JAX
pytrees, so they pass through ``jit`` and ``vmap`` as arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

__all__ = [
    "BlockNoise",
    "DenseNoise",
    "DiagonalNoise",
    "EventBlocksNoise",
    "LowRankNoise",
    "Noise",
    "ScalarNoise",
    "block_diagonal",
]

_LOG_2PI = math.log(2.0 * math.pi)


class Noise:
    """Common interface of all noise covariances; subclasses fill in the maths.

    Residual arrays may carry any leading batch shape: ``r`` has shape ``(..., M)``.
    """

    dim: int

    def whiten(self, r):
        """W r with Wᵀ W = Γ⁻¹: residuals whose noise is N(0, I)."""
        raise NotImplementedError

    def unwhiten(self, e):
        """W⁻¹ e: maps N(0, I) draws onto N(0, Γ)."""
        raise NotImplementedError

    def solve(self, r):
        """Γ⁻¹ r."""
        raise NotImplementedError

    def logdet(self):
        """log det Γ."""
        raise NotImplementedError

    def variances(self):
        """The diagonal of Γ, shape (M,)."""
        raise NotImplementedError

    def to_dense(self):
        """Γ as a dense (M, M) array (for tests and small problems only)."""
        raise NotImplementedError

    def sample(self, rng_key, sample_shape=()):
        """Draws from N(0, Γ), shape ``sample_shape + (M,)``."""
        e = jax.random.normal(rng_key, (*tuple(sample_shape), self.dim))
        return self.unwhiten(e)

    def log_prob(self, r):
        """Gaussian log-density of residuals r under N(0, Γ), summed over the last axis."""
        w = self.whiten(r)
        return -0.5 * (jnp.sum(w * w, axis=-1) + self.logdet() + self.dim * _LOG_2PI)

    def misfit(self, r):
        """Data misfit Φ = ½ ‖Γ^{-1/2} r‖², summed over the last axis."""
        w = self.whiten(r)
        return 0.5 * jnp.sum(w * w, axis=-1)


def _pytree(cls):
    """Registers a noise class whose array fields are listed in ``_fields`` and whose
    static fields (Python ints, tuples) are listed in ``_static``."""

    def flatten(obj):
        return tuple(getattr(obj, f) for f in cls._fields), tuple(
            getattr(obj, f) for f in cls._static
        )

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for f, v in zip(cls._fields, children, strict=True):
            object.__setattr__(obj, f, v)
        for f, v in zip(cls._static, aux, strict=True):
            object.__setattr__(obj, f, v)
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


@_pytree
class ScalarNoise(Noise):
    """Γ = variance · I_M."""

    _fields = ("variance",)
    _static = ("dim",)

    def __init__(self, variance, dim: int):
        self.variance = jnp.asarray(variance)
        self.dim = int(dim)

    def whiten(self, r):
        return r / jnp.sqrt(self.variance)

    def unwhiten(self, e):
        return e * jnp.sqrt(self.variance)

    def solve(self, r):
        return r / self.variance

    def logdet(self):
        return self.dim * jnp.log(self.variance)

    def variances(self):
        return jnp.full((self.dim,), self.variance)

    def to_dense(self):
        return self.variance * jnp.eye(self.dim)

    def __repr__(self):
        return f"ScalarNoise(dim={self.dim})"


@_pytree
class DiagonalNoise(Noise):
    """Γ = diag(variance), variance of shape (M,)."""

    _fields = ("variance",)
    _static = ()

    def __init__(self, variance):
        self.variance = jnp.asarray(variance)

    @property
    def dim(self) -> int:
        return int(self.variance.shape[-1])

    def whiten(self, r):
        return r / jnp.sqrt(self.variance)

    def unwhiten(self, e):
        return e * jnp.sqrt(self.variance)

    def solve(self, r):
        return r / self.variance

    def logdet(self):
        return jnp.sum(jnp.log(self.variance))

    def variances(self):
        return self.variance

    def to_dense(self):
        return jnp.diag(self.variance)

    def __repr__(self):
        return f"DiagonalNoise(dim={self.dim})"


@_pytree
class DenseNoise(Noise):
    """A general SPD Γ held by its lower Cholesky factor L (Γ = L Lᵀ, W = L⁻¹)."""

    _fields = ("scale_tril",)
    _static = ()

    def __init__(self, covariance=None, *, scale_tril=None):
        if (covariance is None) == (scale_tril is None):
            raise ValueError("DenseNoise needs exactly one of covariance or scale_tril.")
        if scale_tril is None:
            scale_tril = jnp.linalg.cholesky(jnp.asarray(covariance))
        self.scale_tril = jnp.asarray(scale_tril)

    @property
    def dim(self) -> int:
        return int(self.scale_tril.shape[-1])

    def whiten(self, r):
        r = jnp.asarray(r)
        flat = r.reshape(-1, self.dim).T
        return solve_triangular(self.scale_tril, flat, lower=True).T.reshape(r.shape)

    def unwhiten(self, e):
        return jnp.einsum("ij,...j->...i", self.scale_tril, e)

    def solve(self, r):
        r = jnp.asarray(r)
        flat = r.reshape(-1, self.dim).T
        return cho_solve((self.scale_tril, True), flat).T.reshape(r.shape)

    def logdet(self):
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(self.scale_tril)))

    def variances(self):
        return jnp.sum(self.scale_tril**2, axis=-1)

    def to_dense(self):
        return self.scale_tril @ self.scale_tril.T

    def __repr__(self):
        return f"DenseNoise(dim={self.dim})"


@_pytree
class LowRankNoise(Noise):
    """Γ = F Fᵀ + diag(D) with F of shape (M, r), whitened in O(M r).

    With V = D^{-1/2} F = Q S Rᵀ (thin SVD), Γ⁻¹ = D^{-1/2} (I − Q diag(s²/(1+s²)) Qᵀ) D^{-1/2},
    whose symmetric square root gives W = (I − Q diag(1 − (1+s²)^{-1/2}) Qᵀ) D^{-1/2}.
    """

    _fields = ("cov_factor", "cov_diag", "_q", "_s2")
    _static = ()

    def __init__(self, cov_factor, cov_diag):
        self.cov_factor = jnp.asarray(cov_factor)
        self.cov_diag = jnp.asarray(cov_diag)
        v = self.cov_factor / jnp.sqrt(self.cov_diag)[:, None]
        q, s, _ = jnp.linalg.svd(v, full_matrices=False)
        self._q = q
        self._s2 = s**2

    @property
    def dim(self) -> int:
        return int(self.cov_diag.shape[-1])

    def _apply(self, x, coef):
        """x − Q diag(coef) Qᵀ x over the last axis."""
        return x - jnp.einsum("ik,...k->...i", self._q, coef * (x @ self._q))

    def whiten(self, r):
        x = r / jnp.sqrt(self.cov_diag)
        return self._apply(x, 1.0 - 1.0 / jnp.sqrt(1.0 + self._s2))

    def unwhiten(self, e):
        x = self._apply(e, 1.0 - jnp.sqrt(1.0 + self._s2))
        return x * jnp.sqrt(self.cov_diag)

    def solve(self, r):
        x = r / jnp.sqrt(self.cov_diag)
        x = self._apply(x, self._s2 / (1.0 + self._s2))
        return x / jnp.sqrt(self.cov_diag)

    def logdet(self):
        return jnp.sum(jnp.log(self.cov_diag)) + jnp.sum(jnp.log1p(self._s2))

    def variances(self):
        return self.cov_diag + jnp.sum(self.cov_factor**2, axis=-1)

    def to_dense(self):
        return self.cov_factor @ self.cov_factor.T + jnp.diag(self.cov_diag)

    def __repr__(self):
        return f"LowRankNoise(dim={self.dim}, rank={self.cov_factor.shape[-1]})"


class _BlockwiseNoise(Noise):
    """A block-diagonal Γ whose ``_map(method, r)`` applies each block's ``method`` to
    its part of the residual's last axis: whiten, unwhiten and solve are blockwise."""

    def _map(self, method, r):
        raise NotImplementedError

    def whiten(self, r):
        return self._map("whiten", r)

    def unwhiten(self, e):
        return self._map("unwhiten", e)

    def solve(self, r):
        return self._map("solve", r)


@_pytree
class EventBlocksNoise(_BlockwiseNoise):
    """Γ = diag(Γ_1, ..., Γ_n): n independent events of size k each, every block a
    :class:`DenseNoise` or :class:`LowRankNoise` with its own parameters (a plate around
    a ``MultivariateNormal`` or ``LowRankMultivariateNormal`` likelihood).

    ``blocks`` is one noise object whose array leaves carry a leading event axis of
    length n (built by :meth:`stack`); every method maps the block's own over the events,
    so the cost is n times one block's, O(n k²) for dense blocks, and no (n k) × (n k)
    matrix is formed.
    """

    _fields = ("blocks",)
    _static = ("num_events", "event_size")

    def __init__(self, blocks, num_events: int, event_size: int):
        self.blocks = blocks
        self.num_events = int(num_events)
        self.event_size = int(event_size)

    @classmethod
    def stack(cls, build, *params):
        """``build(*per_event_params)`` vmapped over the events' leading axis."""
        n, k = params[0].shape[0], params[0].shape[1]
        return cls(jax.vmap(build)(*(jnp.asarray(p) for p in params)), n, k)

    @property
    def dim(self) -> int:
        return self.num_events * self.event_size

    def _map(self, method, r):
        r = jnp.asarray(r)
        lead = r.shape[:-1]
        x = jnp.moveaxis(r.reshape(*lead, self.num_events, self.event_size), -2, 0)
        out = jax.vmap(lambda block, xi: getattr(block, method)(xi))(self.blocks, x)
        return jnp.moveaxis(out, 0, -2).reshape(r.shape)

    def logdet(self):
        return jnp.sum(jax.vmap(lambda block: block.logdet())(self.blocks))

    def variances(self):
        return jax.vmap(lambda block: block.variances())(self.blocks).reshape(-1)

    def to_dense(self):
        dense = jax.vmap(lambda block: block.to_dense())(self.blocks)
        return jax.scipy.linalg.block_diag(*dense)

    def __repr__(self):
        return (
            f"EventBlocksNoise({self.num_events} events of {self.event_size}, "
            f"{type(self.blocks).__name__} blocks)"
        )


@_pytree
class BlockNoise(_BlockwiseNoise):
    """Block-diagonal Γ = diag(Γ_1, ..., Γ_K), one block per observed site, in order."""

    _fields = ("blocks",)
    _static = ("sizes",)

    def __init__(self, blocks):
        self.blocks = tuple(blocks)
        self.sizes = tuple(b.dim for b in self.blocks)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def _split(self, r):
        bounds = [sum(self.sizes[:k]) for k in range(1, len(self.sizes))]
        return jnp.split(r, bounds, axis=-1)

    def _map(self, method, r):
        parts = self._split(jnp.asarray(r))
        return jnp.concatenate(
            [getattr(b, method)(p) for b, p in zip(self.blocks, parts, strict=True)], axis=-1
        )

    def logdet(self):
        return sum(b.logdet() for b in self.blocks)

    def variances(self):
        return jnp.concatenate([b.variances() for b in self.blocks])

    def to_dense(self):
        return jax.scipy.linalg.block_diag(*[b.to_dense() for b in self.blocks])

    def __repr__(self):
        return f"BlockNoise({', '.join(repr(b) for b in self.blocks)})"


def block_diagonal(blocks) -> Noise:
    """Stacks per-site noises; a single block is returned as is and all-diagonal blocks
    collapse into one :class:`DiagonalNoise` (or :class:`ScalarNoise` when all equal)."""
    blocks = tuple(blocks)
    if not blocks:
        raise ValueError("block_diagonal needs at least one noise block.")
    if len(blocks) == 1:
        return blocks[0]
    if all(isinstance(b, ScalarNoise | DiagonalNoise) for b in blocks):
        return DiagonalNoise(jnp.concatenate([b.variances() for b in blocks]))
    return BlockNoise(blocks)

"""Two separated groups of particles in a population, when it has them.

SMC's independence proposal (:func:`eki_infer.smc.move`) draws from a multivariate t
fitted to the population. When the population sits in two separated modes, one t spread
over both proposes mostly between them, where π_t has no mass; a mixture of one t per
mode proposes where the particles are, and because an independence proposal's MH ratio
does not depend on where the current state is, it moves particles between the modes as
easily as within them. That is what lets the chains at t = 1 even out the modes' masses,
which the reweightings set with the noise of a few stages
(``benchmarks/smc_key_robustness.py``: lorenz96's data seed 2, whose posterior is split
between two separated regions). :func:`split_groups` finds the two groups. A split of one
unimodal population (its two halves) costs nothing in exactness and little in efficiency:
a mixture of t's fitted to the halves still covers the whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eki_infer.kalman_transport import regularised_cholesky

__all__ = ["split_groups", "two_means"]


def two_means(particles, live, min_particles: int, candidates: int = 32, iterations: int = 5):
    """``(ones, D)``: the best-separated two-group split of the ``live`` particles
    (boolean ``(N,)``; ``ones`` marks the second group) and its separation D.

    Candidate splits are 2-means (Lloyd) runs over the live particles, unweighted, in the
    Mahalanobis metric of their covariance, each started from one of the ``candidates``
    particles farthest from the mean and the mean itself. The split kept is the one whose
    groups (each of at least ``min_particles`` particles) are best separated along the
    line through their centres:

        D = |m_1 − m_0| / sqrt((v_0 + v_1) / 2)

    (Ashman's D; m_k, v_k the mean and variance of group k's projections). Two Gaussians of
    equal variance are bimodal for D > 2; the two halves of one Gaussian have D ≈ 2.7 and
    those of a uniform (a flat ridge) 3.5. Unlike the 2-means optimum, which halves the
    bigger mode when the other holds a few per cent of the particles, the best separated
    candidate isolates the small mode.
    """
    count = jnp.maximum(jnp.sum(live), 1)
    mean = jnp.sum(jnp.where(live[:, None], particles, 0.0), 0) / count
    centred = jnp.where(live[:, None], particles - mean, 0.0)
    d = particles.shape[1]
    _, chol = regularised_cholesky(centred.T @ centred / count, 1e-9)
    z = jnp.linalg.solve(chol, centred.T).T
    radius = jnp.where(live, jnp.sum(z**2, -1), -jnp.inf)
    starts = jnp.argsort(-radius)[:candidates]

    # Distances and means as matrix-vector products: the candidates run side by side
    # (vmap), and forming (z − b)² per candidate would hold candidates × N × d numbers.
    def mean_of(mask):
        return (mask.astype(z.dtype) @ z) / jnp.maximum(jnp.sum(mask), 1)

    def nearer_b(a, b):
        # |z − b|² < |z − a|²  ⇔  2 z·(b − a) > |b|² − |a|²
        return live & (2.0 * (z @ (b - a)) > b @ b - a @ a)

    def split_from(start):
        def lloyd(_, centres):
            ones = nearer_b(*centres)
            return mean_of(live & ~ones), mean_of(ones)

        a, b = jax.lax.fori_loop(0, iterations, lloyd, (jnp.zeros(d, z.dtype), z[start]))
        ones = nearer_b(a, b)
        x = z @ ((b - a) / jnp.maximum(jnp.linalg.norm(b - a), 1e-300))

        def moments(mask):
            m = jnp.maximum(jnp.sum(mask), 1)
            mu = jnp.sum(jnp.where(mask, x, 0.0)) / m
            return mu, jnp.sum(jnp.where(mask, (x - mu) ** 2, 0.0)) / m

        m1, v1 = moments(ones)
        m0, v0 = moments(live & ~ones)
        sep = jnp.abs(m1 - m0) / jnp.sqrt(jnp.maximum(0.5 * (v0 + v1), 1e-300))
        smaller = jnp.minimum(jnp.sum(ones), jnp.sum(live & ~ones))
        return ones, jnp.where(smaller >= min_particles, sep, 0.0)

    ones, sep = jax.vmap(split_from)(starts)
    best = jnp.argmax(sep)
    return ones[best], sep[best]


def split_groups(particles, live, separation: float = 3.0, min_particles: int | None = None):
    """Boolean ``(N,)`` marking the second of two separated groups of the ``live``
    particles, all False when there is none: :func:`two_means`' split when its D reaches
    ``separation`` (3: more separated than the two halves of a Gaussian, 2.7) and both
    groups hold at least ``min_particles`` live particles (default d + 2, enough for a
    covariance; also keeps one far outlier from being a group)."""
    d = particles.shape[1]
    min_particles = d + 2 if min_particles is None else min_particles
    ones, sep = two_means(particles, live, min_particles)
    return ones & (sep >= separation)

"""Kalman transport for tempered SMC: an affine map of π_t onto the Kalman estimate of
π_1, weighted exactly.

Why
    Along the tempering path the ESS rule takes stages of Δt where the importance weights
    exp(−Δt Φ) keep a fixed ESS fraction; for a nearly Gaussian posterior that is still
    4-5 stages, each costing N − N / P forward evaluations (waste-free, P the chain
    length), although one ensemble Kalman update
    would land the population close to the posterior. Transporting the particles with
    that update and correcting with importance weights keeps SMC consistent while
    skipping the stages the Kalman update already gets right (in the spirit of Sequential
    Kalman Monte Carlo, Grumitt et al. 2024, arXiv:2407.07781, which uses EKI updates
    inside SMC).

What
    From an equally weighted population at temperature t with mean μ, covariance C (as
    :func:`eki_infer.smc.move_stats` regularises it), the statistically linearised
    Gaussian update to temperature 1 (likelihood exp(−(1 − t) Φ), i.e. noise Γ/(1 − t))
    has mean and covariance

        μ' = μ − K ḡ,   K = C^{uG} (C^{GG} + I/Δ)^{-1},   C' = C − K C^{Gu},   Δ = 1 − t,

    in whitened outputs g = Γ^{-1/2}(G(u) − y) (ḡ their mean). Both are computed in the
    smaller of the data space (M × M) and the ensemble space (N × N, by the push-through
    identity), never a larger matrix. The transport is the affine map

        T(u) = μ' + A (u − μ),   A = L' L^{-1}   (C = L Lᵀ, C' = L' L'ᵀ),

    a bijection with constant Jacobian det A. If u ~ π_t, then u' = T(u) has the density
    π_t(T^{-1}u') / |det A|, so the weights

        log w = log π̃_1(u') − log π̃_t(u) + log |det A|,   π̃_s(u) = N(u; 0, I) e^{−sΦ(u)},

    make the weighted population target π_1 and their mean estimates Z_1 / Z_t, for a map
    fixed independently of the particles it moves. For a linear forward map the weights are
    constant up to the Monte-Carlo error of the moments; where the map is nonlinear their
    ESS says how far the Gaussian update is off, and the sampler then falls back to an
    ordinary tempering step.

    The map is cross-fitted (:func:`cross_fitted_maps`): fitted on one half of the
    population and applied to the other, so that no particle is moved by a map fitted to
    itself. The halves are not fully independent (their chains share resampled ancestors
    and the population's proposal statistics), and whether a transport is taken depends
    on the ESS of these weights, as every adaptive SMC step depends on its population;
    cross-fitting removes the direct self-fit, whose bias was large (see
    :func:`cross_fitted_maps`), not these second-order effects. On the linear-Gaussian
    reference model the log-evidence errors with the transport were −0.009, −0.002 and
    +0.004 (``benchmarks/results/smc_accuracy.md``).

Limits
    The weights judge only the particles the map produced: a region of π_1 the Gaussian
    map leaves out is invisible to their ESS. The sampler therefore takes a transport only
    at a high ESS (``transport_ess``, 0.8), where the posterior is close to Gaussian.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

__all__ = [
    "TransportMap",
    "apply_cross_fitted",
    "cross_fitted_maps",
    "kalman_transport_map",
    "regularised_cholesky",
    "regularised_covariance",
    "transport_log_weights",
]


#: the ridge never falls below this many d·ε_machine (relative to tr C / d): rounding
#: in forming C = Σ δδᵀ / n and in its Cholesky factorisation is of order d·ε·‖C‖, so a
#: smaller ridge leaves a near-singular float32 C indefinite (NaN factors; 1e-6 did for
#: 30 dimensions and 100 particles, whose resampled population has few distinct points)
ROUNDING_RIDGE = 16.0
#: times the ridge is multiplied by 10 when a factorisation still fails
_RIDGE_RETRIES = 8


def _ridge(cov, jitter):
    """The ridge fraction of tr C / d: ``jitter``, at least 16 d ε_machine."""
    return jnp.maximum(jitter, ROUNDING_RIDGE * cov.shape[0] * jnp.finfo(cov.dtype).eps)


def _with_ridge(cov, fraction):
    d = cov.shape[0]
    cov = 0.5 * (cov + cov.T)
    scale = jnp.trace(cov) / d
    eps = fraction * jnp.where(scale > 0, scale, 1.0)
    return cov + eps * jnp.eye(d, dtype=cov.dtype)


def regularised_covariance(cov, jitter: float):
    """``cov`` symmetrised plus εI, ε = max(jitter, 16 d ε_machine) · tr C / d (ε =
    jitter when C = 0, all particles in one point): positive definite however few
    distinct particles there are. The one regularisation of SMC's population
    covariances (proposals and transport alike). ε is relative, so it never dominates a
    narrow posterior: an absolute floor (1e-10 before) froze every move of a posterior
    with variances below it in whitened space (e.g. sd 1e-12: every proposal rejected,
    the log evidence 30 too low). The floor at rounding level only acts in float32
    (5e-5 for d = 30 there; 1e-13 in float64, far below the default jitter 1e-6)."""
    return _with_ridge(cov, _ridge(cov, jitter))


def regularised_cholesky(cov, jitter: float):
    """``(C_reg, L)``: :func:`regularised_covariance` and its Cholesky factor. Where
    rounding still leaves C_reg indefinite (a NaN factor), the ridge grows tenfold until
    the factor is finite (at most 8 times), so the moves never draw NaN proposals, which
    the sampler would count as failures of the forward map. (Under ``vmap`` the retry
    loop runs until every factor of the batch is finite; each keeps its own ridge.)"""
    fraction = _ridge(cov, jitter)

    def attempt(k):
        reg = _with_ridge(cov, fraction * 10.0**k)
        return reg, jnp.linalg.cholesky(reg)

    def failed(carry):
        k, _, chol = carry
        return (k < _RIDGE_RETRIES) & ~jnp.all(jnp.isfinite(chol))

    def retry(carry):
        k = carry[0] + 1
        return (k, *attempt(k))

    _, reg, chol = jax.lax.while_loop(failed, retry, (0, *attempt(0)))
    return reg, chol


class TransportMap(NamedTuple):
    """T(u) = ``target_mean`` + (u − ``mean``) Aᵀ (rows), with log |det A| = ``log_det``."""

    mean: jax.Array
    target_mean: jax.Array
    matrix: jax.Array
    log_det: jax.Array


def kalman_transport_map(
    u, outputs, misfit, t, observations, noise, use, jitter: float = 1e-6
) -> TransportMap:
    """The transport map to temperature 1 fitted to the rows ``use`` (boolean (N,)) of
    one population (``u`` (N, d), forward ``outputs`` (N, M), ``misfit`` (N,),
    temperature ``t``); rows with a non-finite misfit are left out. The covariance is
    regularised as the proposals' is (:func:`regularised_covariance`)."""
    ok = jnp.isfinite(misfit) & use
    n = jnp.maximum(jnp.sum(ok), 1).astype(u.dtype)
    w = ok / n
    mean = w @ u
    anomalies = jnp.where(ok[:, None], u - mean, 0.0) / jnp.sqrt(n)
    eye = jnp.eye(u.shape[1], dtype=u.dtype)
    cov, chol = regularised_cholesky(anomalies.T @ anomalies, jitter)
    g = noise.whiten(jnp.where(ok[:, None], outputs - observations, 0.0))
    g_mean = w @ g
    g_anomalies = jnp.where(ok[:, None], g - g_mean, 0.0) / jnp.sqrt(n)
    delta = jnp.maximum(1.0 - t, 1e-300)
    num, data_dim = g_anomalies.shape
    if data_dim <= num:
        # data space: R = GᵀG + I/Δ (M × M)
        r = g_anomalies.T @ g_anomalies + jnp.eye(data_dim, dtype=u.dtype) / delta
        chol_r = jnp.linalg.cholesky(r)
        cross = anomalies.T @ g_anomalies  # C^{uG} (d, M)

        def solve_r(b):
            return jax.scipy.linalg.cho_solve((chol_r, True), b)

        shift = cross @ solve_r(g_mean)
        reduction = cross @ solve_r(cross.T)
    else:
        # ensemble space: (I + Δ G Gᵀ)^{-1} (N × N), by the push-through identity
        s = jnp.eye(num, dtype=u.dtype) + delta * (g_anomalies @ g_anomalies.T)
        chol_s = jnp.linalg.cholesky(s)
        x = jax.scipy.linalg.cho_solve((chol_s, True), anomalies)  # (I + ΔS)^{-1} U
        shift = delta * x.T @ (g_anomalies @ g_mean)
        reduction = anomalies.T @ anomalies - anomalies.T @ x
    # C' is positive definite in exact arithmetic; the ridge only catches rounding
    _, target_chol = regularised_cholesky(cov - reduction, 0.0)
    matrix = target_chol @ solve_triangular(chol, eye, lower=True)
    log_det = jnp.sum(jnp.log(jnp.diagonal(target_chol))) - jnp.sum(jnp.log(jnp.diagonal(chol)))
    return TransportMap(mean, mean - shift, matrix, log_det)


def cross_fitted_maps(u, outputs, misfit, t, observations, noise, fold, jitter: float = 1e-6):
    """Two maps, ``maps[f]`` fitted to the rows whose ``fold`` (0 or 1, (N,)) is f; stacked
    along a leading axis of 2. Each row is then moved by the map of the other fold
    (:func:`apply_cross_fitted`), so that no particle is moved by a map fitted to itself.

    Why: a map fitted to the particles it moves carries their own Monte-Carlo
    fluctuations (the moved sample has exactly the target moments), and the mean weight
    then overestimates Z_1 / Z_t (on the linear-Gaussian test problem with 300 particles
    by several of its standard deviations); with the other fold's map no weight depends
    on its own particle through the map."""
    # lax.map, not vmap: no batched factorisation (see eki_infer.smc.move_stats)
    return jax.lax.map(
        lambda f: kalman_transport_map(
            u, outputs, misfit, t, observations, noise, fold == f, jitter
        ),
        jnp.arange(2),
    )


def apply_cross_fitted(maps: TransportMap, u, fold):
    """Rows ``u`` moved by the map of the other fold; returns ``(moved, log_det)`` per row.
    A row whose map is not finite (the fitted target covariance lost positive
    definiteness) stays where it is with log_det −∞, i.e. weight zero, so that the
    forward map never sees a NaN parameter. (A fold without finite particles gives a
    finite map that moves nothing: covariance jitter · I, no shift.)"""
    other = (1 - fold)[:, None] == 1
    # both maps on every row (2 n d numbers), then each row's: no per-row gather of A
    both = maps.target_mean[:, None] + jnp.einsum(
        "fab,fnb->fna", maps.matrix, u[None] - maps.mean[:, None]
    )
    moved = jnp.where(other, both[1], both[0])
    log_det = jnp.where(other[:, 0], maps.log_det[1], maps.log_det[0])
    ok = jnp.all(jnp.isfinite(moved), axis=-1) & jnp.isfinite(log_det)
    return jnp.where(ok[:, None], moved, u), jnp.where(ok, log_det, -jnp.inf)


def transport_log_weights(u, misfit, t, moved, moved_misfit, log_det):
    """log w = log π̃_1(T u) − log π̃_t(u) + log |det A| per row (−∞ where the moved
    particle's forward map failed). At t = 0 the source density is the prior's whatever
    Φ(u) is: a prior draw whose own forward run failed is still a valid draw, and its
    image can carry weight."""
    log_new = -0.5 * jnp.sum(moved**2, axis=-1) - moved_misfit
    tempered = jnp.where(t > 0, t * misfit, 0.0)
    log_old = -0.5 * jnp.sum(u**2, axis=-1) - tempered
    log_w = log_new - log_old + log_det
    ok = jnp.isfinite(moved_misfit) & jnp.isfinite(log_old) & jnp.isfinite(log_det)
    return jnp.where(ok, log_w, -jnp.inf)

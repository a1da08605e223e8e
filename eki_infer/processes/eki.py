"""Ensemble Kalman inversion (EKI): perturbed-observation and ensemble-transform updates.

Two variants of the tempering update u ← u + C^{uG}(C^{GG} + Γ/Δt)⁻¹(y + η − G(u))
(Iglesias, Law & Stuart 2013; ALGORITHMS.md §1), both in whitened output space where
Γ = I:

- ``"perturbed"``: η^(j) ~ N(0, Γ/Δt), i.e. N(0, I/Δt) in whitened space, drawn
  afresh every step. Started from prior draws with steps summing to T = 1 this samples
  the posterior of a linear-Gaussian problem as J → ∞ (Monte-Carlo error ~ J^{-1/2}).
  The innovations enter multiplied by Δt, Δt (ỹ − g̃) + √Δt ξ, so Δt = 0 gives no
  infinite noise (and the update is a no-op then anyway).
- ``"transform"`` (deterministic square root, ETKI-style): with anomalies X, Y (1/n
  normalisation, see :mod:`eki_infer.processes.base`),
  Ω = (I + Δt Y Yᵀ)⁻¹, w = Ω Y Δt (ỹ − ḡ̃), u ← ū + wᵀX + √n Ω^{1/2} X. The new
  ensemble's mean and 1/n covariance are exactly the Kalman posterior of the Gaussian
  N(ū, XᵀX) given a linear G — for any step sequence summing to 1. Ω and Ω^{1/2} are
  applied through the eigendecomposition of the J × J Gram matrix Y Yᵀ (J ≤ M) or the
  thin SVD of Y (J > M), costing O(J M min(J, M) + min(J, M)³ + J d min(J, M)).

Both variants keep members in the affine span of the initial ensemble (rank ≤ J − 1),
so J > d is needed for a full-rank posterior. Failed members (non-finite outputs) are
ignored by the statistics and redrawn from the Gaussian fitted to the updated
successful members.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eki_infer.processes.base import (
    EnsembleProcess,
    anomalies,
    check_ensemble_size,
    detect_failures,
    ensemble_process,
    kalman_increments,
    keep_if_moved,
    redraw_failed,
    whiten_outputs,
)

__all__ = ["EKI_VARIANTS", "eki", "eki_perturbed_update", "eki_transform_update"]

EKI_VARIANTS = ("perturbed", "transform")


def eki_perturbed_update(rng_key, u, g, y, noise, dt, failed=None):
    """One perturbed-observation EKI step.

    Args:
        rng_key: PRNG key; split into ``(k_obs, k_fail)``: the whitened perturbations are
            ``ξ = jax.random.normal(k_obs, g.shape)`` (η = W⁻¹ ξ / √Δt) and ``k_fail``
            redraws failed members.
        u: ensemble, shape ``(J, d)``.
        g: forward-map outputs at ``u``, shape ``(J, M)`` (rows with NaN/inf fail).
        y: observations, shape ``(M,)``.
        noise: a :class:`eki_infer.noise.Noise` for Γ.
        dt: step size Δt ≥ 0 (Δt = 0 returns ``u`` unchanged).
        failed: optional ``(J,)`` flags of members known to have failed.

    Returns:
        The updated ensemble, shape ``(J, d)``.
    """
    dt = jnp.asarray(dt, dtype=u.dtype)
    ok = ~detect_failures(g, failed)
    k_obs, k_fail = jax.random.split(rng_key)
    gw, yw = whiten_outputs(g, ok, y, noise)
    _, yanom, count = anomalies(gw, ok)
    xi = jax.random.normal(k_obs, gw.shape, dtype=u.dtype)
    scaled = dt * (yw - gw) + jnp.sqrt(jnp.maximum(dt, 0.0)) * xi
    new = u + kalman_increments(yanom, dt, scaled, u, ok, count)
    new = redraw_failed(k_fail, new, ok)
    return keep_if_moved(dt, new, u)


def eki_transform_update(rng_key, u, g, y, noise, dt, failed=None):
    """One deterministic ensemble-transform (square-root) EKI step.

    Same arguments as :func:`eki_perturbed_update`; ``rng_key`` is used only to redraw
    failed members. Without failures the result is deterministic.
    """
    dt = jnp.asarray(dt, dtype=u.dtype)
    ok = ~detect_failures(g, failed)
    gw, yw = whiten_outputs(g, ok, y, noise)
    mean_u, x, count = anomalies(u, ok)
    mean_g, yanom, _ = anomalies(gw, ok)
    # Ω = (I + Δt Y Yᵀ)⁻¹ = I − U diag(λ/(1+λ)) Uᵀ with Y Yᵀ = U diag(s²) Uᵀ, λ = Δt s²:
    # from the J × J Gram matrix when J ≤ M, else from the thin SVD of Y (J × M).
    j, m = yanom.shape
    if j <= m:
        s2, left = jnp.linalg.eigh(yanom @ yanom.T)
        s2 = jnp.clip(s2, 0.0)
    else:
        left, s, _ = jnp.linalg.svd(yanom, full_matrices=False)
        s2 = s * s
    lam = dt * s2
    b = dt * (yanom @ (yw - mean_g))
    w = b - left @ ((lam / (1.0 + lam)) * (left.T @ b))
    shrink = 1.0 - 1.0 / jnp.sqrt(1.0 + lam)
    sqrt_omega_x = x - left @ (shrink[:, None] * (left.T @ x))
    new = mean_u + w @ x + jnp.sqrt(count) * sqrt_omega_x
    new = redraw_failed(rng_key, new, ok)
    return keep_if_moved(dt, new, u)


def eki(ensemble_size: int, variant: str = "perturbed") -> EnsembleProcess:
    """Ensemble Kalman inversion as an :class:`EnsembleProcess`.

    Args:
        ensemble_size: number of members J (≥ 2; J > d for a full-rank posterior).
        variant: ``"perturbed"`` (default) or ``"transform"``.

    Returns:
        An :class:`EnsembleProcess` named ``"eki"`` whose state is an
        :class:`EnsembleState`; ``samples`` returns the ensemble itself.
    """
    ensemble_size = check_ensemble_size(ensemble_size)
    if variant not in EKI_VARIANTS:
        raise ValueError(f"eki: variant must be one of {EKI_VARIANTS}, got {variant!r}.")
    step = eki_perturbed_update if variant == "perturbed" else eki_transform_update
    return ensemble_process("eki", ensemble_size, step)

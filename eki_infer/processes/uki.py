"""Unscented Kalman inversion (UKI): a Gaussian N(m, C) updated through sigma points.

Huang, Schneider & Stuart (2022) and Huang, Huang, Reich & Stuart (2022);
ALGORITHMS.md §5. Symmetric sigma points (2d + 1) with

    a = min(√(4/d), 1),  c = a √d,  W^c_j = 1/(2 a² d) (j = 1..2d),
    θ^0 = m̂,  θ^j = m̂ + c [√Ĉ]_j,  θ^{j+d} = m̂ − c [√Ĉ]_j   ([√Ĉ]_j: Cholesky column j),

and the modified transform (mean weight 1 on the centre point, ŷ = G(θ^0)). The
analysis is computed in whitened output space with the 2d × 2d push-through form:
with Θ_j = √W_j (θ^j − m̂) and Y_j = √W_j (g̃^j − ŷ) (rows, j ≥ 1),

    m ← m̂ + Θᵀ (I + Δt' Y Yᵀ)⁻¹ Y Δt' (ỹ − ŷ),    C ← Θᵀ (I + Δt' Y Yᵀ)⁻¹ Θ,

which equals m̂ + C^{θy}(C^{yy})⁻¹(ỹ − ŷ) and Ĉ − C^{θy}(C^{yy})⁻¹C^{θy}ᵀ with
C^{yy} = YᵀY + Σ_ν, Σ_ν = (s/Δt) I, Δt' = Δt/s; the new C is a Gram matrix, hence
symmetric positive semi-definite by construction, and no M × M matrix is formed.

Two modes:

- ``"tempering"`` (the posterior mode): start at the prior (m = 0, C = I), no
  prediction step (α = 1, Σ_ω = 0), Σ_ν = Γ/Δt (s = 1). For a linear G this is the
  exact Kalman posterior for any step sequence summing to T = 1; for a nonlinear G it
  is a Gaussian approximation.
- ``"iterative"`` (the optimisation mode of the papers): prediction
  m̂ = r + α(m − r) with r = 0 (the prior mean), Ĉ = α² C + Σ_ω with
  Σ_ω = (2 − α²) C0 = (2 − α²) I (``update_freq = 0``) or Σ_ω = (2 − α²) C_n refreshed
  every ``update_freq`` iterations, and Σ_ν = 2Γ/Δt (s = 2): with Δt = 1 (the
  ``DefaultScheduler``) this is exactly the papers' Σ_ν = 2Γ; other Δt act as a
  tempering of the data. Useful beyond T = 1.

Failed sigma points (non-finite outputs) are dropped and the remaining off-centre
weights are rescaled so that they sum to their original total (as the reference Julia
code does); the means are the centre point's when it succeeded, otherwise the
equal-weight means of the successful off-centre points; Ĉ is re-estimated from the same
weighted points so the analysis stays positive semi-definite. A direction whose ±
points both failed loses its variance; :func:`~eki_infer.processes.base.psd_sqrt`
copes with the resulting singular C.

UKI carries a dense d × d covariance and evaluates 2d + 1 points per iteration: it
suits moderate d (up to a few hundred), whatever M and the noise structure.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from eki_infer.processes.base import (
    EnsembleProcess,
    detect_failures,
    keep_if_moved,
    masked_mean,
    psd_sqrt,
    whiten_outputs,
)

__all__ = [
    "UKI_MODES",
    "UKIState",
    "sigma_point_constants",
    "sigma_points",
    "uki",
    "uki_predict",
    "uki_update",
]

UKI_MODES = ("tempering", "iterative")


class UKIState(NamedTuple):
    """State of UKI.

    Attributes:
        mean: the Gaussian's mean m after the last analysis, shape ``(d,)``.
        cov: its covariance C, shape ``(d, d)``.
        evolution_cov: the prediction covariance Σ_ω, shape ``(d, d)`` (zeros in
            tempering mode).
        iteration: number of updates applied (int32 scalar).
    """

    mean: jax.Array
    cov: jax.Array
    evolution_cov: jax.Array
    iteration: jax.Array


def sigma_point_constants(dim: int):
    """``(a, c, w_c)`` of the symmetric sigma points for dimension ``dim``."""
    a = min(math.sqrt(4.0 / dim), 1.0)
    c = a * math.sqrt(dim)
    w_c = 1.0 / (2.0 * a * a * dim)
    return a, c, w_c


def sigma_points(mean, cov):
    """The 2d + 1 symmetric sigma points of N(mean, cov), shape ``(2d + 1, d)``.

    Row 0 is the mean, rows 1..d are ``mean + c L[:, i]`` and rows d+1..2d are
    ``mean − c L[:, i]`` with L the Cholesky factor (or another square root when the
    covariance is singular).
    """
    d = mean.shape[-1]
    _, c, _ = sigma_point_constants(d)
    offsets = c * psd_sqrt(cov).T
    return jnp.concatenate([mean[None, :], mean + offsets, mean - offsets], axis=0)


def uki_predict(state, mode: str = "tempering", alpha_reg: float = 1.0):
    """The predicted Gaussian ``(m̂, Ĉ)`` whose sigma points are evaluated next."""
    if mode == "tempering":
        return state.mean, state.cov
    return alpha_reg * state.mean, alpha_reg**2 * state.cov + state.evolution_cov


def uki_update(
    state,
    g,
    y,
    noise,
    dt,
    failed=None,
    *,
    mode: str = "tempering",
    alpha_reg: float = 1.0,
    update_freq: int = 0,
):
    """One UKI step (analysis of the points of :func:`uki_predict`).

    Args:
        state: a :class:`UKIState`.
        g: forward-map outputs at ``sigma_points(*uki_predict(state, ...))``, shape
            ``(2d + 1, M)``.
        y: observations, shape ``(M,)``.
        noise: a :class:`eki_infer.noise.Noise` for Γ.
        dt: step size Δt ≥ 0 (Δt = 0 returns ``state`` unchanged).
        failed: optional ``(2d + 1,)`` flags of sigma points known to have failed.
        mode, alpha_reg, update_freq: as in :func:`uki`.

    Returns:
        The updated :class:`UKIState`.
    """
    mean = state.mean
    d = mean.shape[-1]
    dtype = mean.dtype
    dt = jnp.asarray(dt, dtype=dtype)
    scale = 1.0 if mode == "tempering" else 2.0
    dt_eff = dt / scale

    m_hat, c_hat = uki_predict(state, mode, alpha_reg)
    theta = sigma_points(m_hat, c_hat)
    ok = ~detect_failures(g, failed)
    gw, yw = whiten_outputs(g, ok, y, noise)

    _, _, w_c = sigma_point_constants(d)
    ok_centre, ok_off = ok[0], ok[1:]
    n_off = jnp.maximum(jnp.sum(ok_off), 1).astype(dtype)
    weights = jnp.where(ok_off, w_c * (2 * d) / n_off, 0.0)
    m_s = jnp.where(ok_centre, theta[0], masked_mean(theta[1:], ok_off))
    y_hat = jnp.where(ok_centre, gw[0], masked_mean(gw[1:], ok_off))
    root_w = jnp.sqrt(weights)[:, None]
    big_theta = root_w * (theta[1:] - m_s)
    big_y = root_w * jnp.where(ok_off[:, None], gw[1:] - y_hat, 0.0)

    s = jnp.eye(2 * d, dtype=dtype) + dt_eff * (big_y @ big_y.T)
    chol = jnp.linalg.cholesky(s)
    # One forward solve for both right-hand sides, then the back solve: the two solves
    # depend on each other, so XLA never runs two chain-batched LAPACK calls side by
    # side (on jaxlib 0.10's CPU backend those can starve its thread pool; smc.py).
    rhs = jnp.concatenate([big_theta, (big_y @ (dt_eff * (yw - y_hat)))[:, None]], axis=1)
    half = solve_triangular(chol, rhs, lower=True)
    z = half[:, :-1]
    gain_w = solve_triangular(chol.T, half[:, -1], lower=False)
    new_mean = m_s + big_theta.T @ gain_w
    new_cov = z.T @ z

    iteration = state.iteration + 1
    evolution_cov = state.evolution_cov
    if mode == "iterative" and update_freq > 0:
        refresh = (iteration % update_freq) == 0
        evolution_cov = jnp.where(refresh, (2.0 - alpha_reg**2) * new_cov, evolution_cov)
    new = UKIState(new_mean, new_cov, evolution_cov, iteration)
    return keep_if_moved(dt, new, state)


def uki(mode: str = "tempering", alpha_reg: float = 1.0, update_freq: int = 0) -> EnsembleProcess:
    """Unscented Kalman inversion as an :class:`EnsembleProcess`.

    The prior (initial Gaussian) is N(0, I_d), whitened parameter space's prior.

    Args:
        mode: ``"tempering"`` (default; the posterior after steps summing to T = 1) or
            ``"iterative"`` (the regularised optimisation mode of the papers).
        alpha_reg: regularisation α ∈ (0, 1] of the iterative mode's prediction
            (1 = none); must stay 1 in tempering mode.
        update_freq: iterative mode only: 0 keeps Σ_ω = (2 − α²) I; k > 0 refreshes
            Σ_ω = (2 − α²) C_n every k iterations.

    Returns:
        An :class:`EnsembleProcess` named ``"uki"`` whose state is a :class:`UKIState`;
        ``points`` gives the 2d + 1 sigma points and ``samples`` draws from N(m, C).
    """
    if mode not in UKI_MODES:
        raise ValueError(f"uki: mode must be one of {UKI_MODES}, got {mode!r}.")
    alpha_reg = float(alpha_reg)
    if not 0.0 < alpha_reg <= 1.0:
        raise ValueError(f"uki: alpha_reg must lie in (0, 1], got {alpha_reg}.")
    if isinstance(update_freq, bool) or int(update_freq) != update_freq or update_freq < 0:
        raise ValueError(f"uki: update_freq must be a non-negative integer, got {update_freq!r}.")
    update_freq = int(update_freq)
    if mode == "tempering" and (alpha_reg != 1.0 or update_freq != 0):
        raise ValueError(
            "uki: alpha_reg and update_freq apply to mode='iterative' only; tempering mode "
            "uses alpha_reg=1 and no prediction covariance."
        )

    def init(rng_key, dim):
        del rng_key
        dim = int(dim)
        eye = jnp.eye(dim)
        evolution = (2.0 - alpha_reg**2) * eye if mode == "iterative" else jnp.zeros_like(eye)
        return UKIState(jnp.zeros(dim), eye, evolution, jnp.zeros((), dtype=jnp.int32))

    def points(state):
        return sigma_points(*uki_predict(state, mode, alpha_reg))

    def update(rng_key, state, outputs, failed, observations, noise, dt):
        del rng_key
        return uki_update(
            state,
            outputs,
            observations,
            noise,
            dt,
            failed,
            mode=mode,
            alpha_reg=alpha_reg,
            update_freq=update_freq,
        )

    def samples(rng_key, state, num_samples):
        d = state.mean.shape[-1]
        xi = jax.random.normal(rng_key, (int(num_samples), d), dtype=state.mean.dtype)
        return state.mean + xi @ psd_sqrt(state.cov).T

    return EnsembleProcess("uki", init, points, update, samples)

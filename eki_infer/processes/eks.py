"""Ensemble Kalman sampler (EKS) with the ALDI finite-ensemble correction.

The linearly implicit step of Garbuno-Inigo, Hoffmann, Li & Stuart (2020) with the
correction of Garbuno-Inigo, Nüsken & Reich (2020) (ALGORITHMS.md §4), in whitened
space (prior N(0, I), noise I):

    (I + Δt C) u*^(j) = u^(j) − Δt Σ_k D_jk (u^(k) − ū) + Δt (d + 1)/n (u^(j) − ū)   [ALDI]
    u^(j) ← u*^(j) + √(2Δt) Xᵀ ξ^(j),   ξ^(j) ~ N(0, I_J)

with D_jk = 1/n ⟨g̃_k − ḡ̃, g̃_j − ỹ⟩, C = XᵀX and X = (u − ū)/√n the 1/n-scaled
anomalies (n successful members), so Xᵀξ is the ensemble square root C^{1/2} ξ. The
drift Σ_k D_jk (u^(k) − ū) is the row (g̃_j − ỹ) Yᵀ X, evaluated as a chained product in
the cheapest order; the implicit solve uses the d × d system when d ≤ J and the
Woodbury identity (J × J) when d > J, so no d × d matrix is formed then.

ALDI (default) leaves the posterior invariant at finite J > d + 1 for linear problems;
plain EKS (``aldi=False``) is under-dispersed at small J. The posterior is the
long-time limit, not T = 1: run to equilibrium and, for summaries, pool the ensemble
over the last iterations with weights Δt (a time average; with the ensemble-dependent
step of ``EKSStableScheduler`` an unweighted average over-weights small-step states).
Step-size bias is real: see :mod:`eki_infer.schedulers` for the measurements behind
the default numerator 0.1.
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
    implicit_solve,
    keep_if_moved,
    redraw_failed,
    whiten_outputs,
)

__all__ = ["eks", "eks_update"]


def eks_update(rng_key, u, g, y, noise, dt, failed=None, aldi: bool = True):
    """One EKS / ALDI step.

    Args:
        rng_key: PRNG key; split into ``(k_noise, k_fail)``: the diffusion uses
            ``ξ = jax.random.normal(k_noise, (J, J))`` (row j is ξ^(j)) and ``k_fail``
            redraws failed members.
        u: ensemble, shape ``(J, d)``.
        g: forward-map outputs at ``u``, shape ``(J, M)``.
        y: observations, shape ``(M,)``.
        noise: a :class:`eki_infer.noise.Noise` for Γ.
        dt: step size Δt ≥ 0 (Δt = 0 returns ``u`` unchanged).
        failed: optional ``(J,)`` flags of members known to have failed.
        aldi: include the (d + 1)/n correction (default True).

    Returns:
        The updated ensemble, shape ``(J, d)``.
    """
    dt = jnp.asarray(dt, dtype=u.dtype)
    j, d = u.shape
    ok = ~detect_failures(g, failed)
    k_noise, k_fail = jax.random.split(rng_key)
    gw, yw = whiten_outputs(g, ok, y, noise)
    mean_u, x, count = anomalies(u, ok)
    _, yanom, _ = anomalies(gw, ok)
    drift = jnp.linalg.multi_dot([gw - yw, yanom.T, x])
    rhs = u - dt * drift
    if aldi:
        rhs = rhs + dt * (d + 1) / count * (u - mean_u)
    ustar = implicit_solve(x, dt, rhs)
    xi = jax.random.normal(k_noise, (j, j), dtype=u.dtype)
    new = ustar + jnp.sqrt(2.0 * jnp.maximum(dt, 0.0)) * (xi @ x)
    new = redraw_failed(k_fail, new, ok)
    return keep_if_moved(dt, new, u)


def eks(ensemble_size: int, aldi: bool = True) -> EnsembleProcess:
    """The ensemble Kalman sampler as an :class:`EnsembleProcess`.

    Args:
        ensemble_size: number of members J (ALDI needs J > d + 1 to be ergodic).
        aldi: use the ALDI correction (default True); False gives plain EKS.

    Returns:
        An :class:`EnsembleProcess` named ``"eks"`` whose state is an
        :class:`EnsembleState`; ``samples`` returns the current ensemble.
    """
    ensemble_size = check_ensemble_size(ensemble_size)
    aldi = bool(aldi)

    def step(rng_key, u, outputs, observations, noise, dt, failed):
        return eks_update(rng_key, u, outputs, observations, noise, dt, failed, aldi)

    return ensemble_process("eks", ensemble_size, step)

"""Cheap checks of whether a Gaussian-approximate run (EKI, EKS, UKI) is good enough.

:func:`gaussian_approximation_check` asks one question: is the true posterior close to
the Gaussian the run produced? It fits q = N(m, C) in whitened space u (UKI: its own
Gaussian; EKI/EKS: mean and covariance of the final ensemble), draws fresh points from
q, evaluates the forward map on them once (one batched call) and computes
self-normalised importance weights against the exact unnormalised posterior

    log w(u) = −½‖u‖² − Φ(u) − log q(u),

which are computable because the prior in u-space is exactly N(0, I) and the
likelihood is Gaussian with known Γ. It reports the effective sample size fraction
ESS/n (1 when q equals the posterior), Pareto-free tail information (the largest
normalised weight) and the importance-corrected mean shift in q's standard deviations.

Limits (read before trusting a "good"):

- Importance sampling from a Gaussian whose tails are lighter than the posterior's
  (funnels, heavy-tailed scale priors) can *look* fine by chance: the missing mass is
  never sampled. A low ESS is a reliable alarm; a high ESS is evidence, not proof.
- In high dimension (d ≳ 50) the ESS of any imperfect q collapses; the check is meant
  for the moderate d of calibration problems.
- It costs ``num_draws`` forward evaluations per chain; for a decisive answer run
  ``EKIInference(model, method="smc")`` instead.
- A multimodal posterior whose other mode q does not reach goes unseen.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

__all__ = ["GaussianCheck", "gaussian_approximation_check"]


class GaussianCheck(NamedTuple):
    """Result per chain (arrays of shape (num_chains,)).

    Attributes:
        ess_fraction: ESS / n of the importance weights (1 = perfect).
        max_weight: the largest normalised weight (≈ 1/n when perfect, → 1 when bad).
        mean_shift: max over coordinates of |E_w[u] − m| / sd_q: how far the weighted
            mean moves, in q's standard deviations (whitened coordinates).
        good: ess_fraction ≥ threshold (all chains).
        threshold: the ESS fraction used for ``good``.
    """

    ess_fraction: np.ndarray
    max_weight: np.ndarray
    mean_shift: np.ndarray
    good: bool
    threshold: float


def _gaussians(engine):
    state = engine.final_state
    if state is None or engine.problem is None:
        raise RuntimeError("run the engine first.")
    if engine.method == "uki":
        return jnp.asarray(state.mean), jnp.asarray(state.cov)
    u = jnp.asarray(state.particles)  # EKI/EKS (and SMC) ensembles: (chains, J, d)
    mean = u.mean(axis=1)
    du = u - mean[:, None, :]
    cov = jnp.einsum("cni,cnj->cij", du, du) / u.shape[1]
    return mean, cov


def gaussian_approximation_check(
    engine, rng_key=None, num_draws: int = 2000, threshold: float = 0.3
) -> GaussianCheck:
    """Importance-sampling check of an EKI/EKS/UKI run's Gaussian against the exact
    posterior (see the module docstring for what it can and cannot tell).

    Args:
        engine: a finished :class:`~eki_infer.EKIInference`.
        rng_key: key for the draws (default PRNGKey(0)).
        num_draws: draws per chain (= forward evaluations per chain).
        threshold: ESS fraction below which the approximation is called poor.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    problem = engine.problem
    mean, cov = _gaussians(engine)
    d = mean.shape[-1]
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    cov = cov + (1e-9 * jnp.trace(cov, axis1=-2, axis2=-1) / d)[:, None, None] * jnp.eye(d)
    chol = jnp.linalg.cholesky(cov)
    keys = jax.random.split(rng_key, mean.shape[0])
    xi = jax.vmap(lambda k: jax.random.normal(k, (num_draws, d)))(keys)
    u = mean[:, None, :] + jnp.einsum("cij,cnj->cni", chol, xi)
    outputs = jax.jit(problem.forward)(u)
    ok = jnp.all(jnp.isfinite(outputs), axis=-1)
    residual = jnp.where(ok[..., None], problem.observations - outputs, 0.0)
    phi = problem.noise.misfit(residual)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_q = -0.5 * jnp.sum(xi**2, axis=-1) - 0.5 * logdet[:, None]
    log_w = -0.5 * jnp.sum(u**2, axis=-1) - phi - log_q
    log_w = jnp.where(ok & jnp.isfinite(log_w), log_w, -jnp.inf)
    log_w = log_w - logsumexp(log_w, axis=1, keepdims=True)
    w = jnp.exp(log_w)
    ess = 1.0 / jnp.sum(w**2, axis=1) / num_draws
    shift = jnp.einsum("cn,cni->ci", w, u) - mean
    sd = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))
    ess = np.asarray(ess)
    return GaussianCheck(
        ess_fraction=ess,
        max_weight=np.asarray(w.max(axis=1)),
        mean_shift=np.asarray(jnp.max(jnp.abs(shift) / sd, axis=-1)),
        good=bool(np.all(ess >= threshold)),
        threshold=float(threshold),
    )

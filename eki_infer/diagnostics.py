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
normalised weight) and how far the weights move the draws' mean, in q's standard
deviations.

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

from eki_infer.blas_threads import limited_blas_threads
from eki_infer.executors import using_executor
from eki_infer.keys import check_rng_key
from eki_infer.user_warnings import warn
from eki_infer.validation import check_count

__all__ = ["GaussianCheck", "gaussian_approximation_check"]

_EIGENVALUE_FLOOR = 100.0
"""Eigenvalues of q's covariance below this many machine epsilons of the largest are
raised to it: q stays a proper Gaussian when the ensemble is nearly flat in some
direction (a float32 run, or J barely above d), instead of a NaN Cholesky factor."""


class GaussianCheck(NamedTuple):
    """Result per chain (arrays of shape (num_chains,)).

    Attributes:
        ess_fraction: ESS / n of the importance weights (1 = perfect; 0 when every draw
            failed).
        max_weight: the largest normalised weight (≈ 1/n when perfect, → 1 when bad;
            NaN when every draw failed).
        mean_shift: max over coordinates of |E_w[u] − ū| / sd_q, with ū the unweighted
            mean of the same draws: how far the weights move the mean, in q's standard
            deviations (whitened coordinates). Exactly 0 when q is the posterior, so it
            carries no Monte-Carlo noise of q's own draws.
        good: ess_fraction ≥ threshold (all chains).
        threshold: the ESS fraction used for ``good``.
        failed: draws per chain where the forward map failed (given zero weight).
    """

    ess_fraction: np.ndarray
    max_weight: np.ndarray
    mean_shift: np.ndarray
    good: bool
    threshold: float
    failed: np.ndarray


def _gaussians(engine):
    """q's mean (chains, d) and covariance (chains, d, d) in whitened space."""
    state = engine.final_state
    if engine.method == "uki":
        return jnp.asarray(state.mean), jnp.asarray(state.cov)
    u = jnp.asarray(state.particles)  # EKI/EKS (and SMC) ensembles: (chains, J, d)
    size, d = u.shape[1], u.shape[2]
    if size <= d:
        raise ValueError(
            f"gaussian_approximation_check: the {engine.method.upper()} ensemble has "
            f"{size} members for {d} parameters, so its covariance is singular and a "
            f"Gaussian fitted to it has no density; run with ensemble_size > {d}."
        )
    mean = u.mean(axis=1)
    du = u - mean[:, None, :]
    cov = jnp.einsum("cni,cnj->cij", du, du) / size
    return mean, cov


def _square_roots(cov):
    """Per chain a square root S (S Sᵀ = cov, eigenvalues floored) and log det(S Sᵀ)."""
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    lam, vec = jnp.linalg.eigh(cov)
    floor = _EIGENVALUE_FLOOR * jnp.finfo(cov.dtype).eps * jnp.max(lam, axis=-1, keepdims=True)
    lam = jnp.maximum(lam, jnp.maximum(floor, jnp.finfo(cov.dtype).tiny))
    return vec * jnp.sqrt(lam)[:, None, :], jnp.sum(jnp.log(lam), axis=-1)


def gaussian_approximation_check(
    engine, rng_key=None, num_draws: int = 2000, threshold: float = 0.3
) -> GaussianCheck:
    """Importance-sampling check of an EKI/EKS/UKI run's Gaussian against the exact
    posterior (see the module docstring for what it can and cannot tell).

    The forward runs go through the engine's executor (and BLAS thread limit), as the
    run's own did. Draws where the forward map fails get zero weight and are counted in
    ``failed`` (with a warning): the check then describes the posterior where the
    model works.

    Args:
        engine: a finished :class:`~eki_infer.EKIInference`.
        rng_key: key for the draws (default PRNGKey(0)).
        num_draws: draws per chain (= forward evaluations per chain), at least 2.
        threshold: ESS fraction below which the approximation is called poor, in (0, 1].
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    check_rng_key(rng_key)
    check_count("num_draws", num_draws, minimum=2)
    if isinstance(threshold, str | bool) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    problem = engine.problem
    mean, cov = _gaussians(engine)
    d = mean.shape[-1]
    root, logdet = _square_roots(cov)
    keys = jax.random.split(rng_key, mean.shape[0])
    xi = jax.vmap(lambda k: jax.random.normal(k, (num_draws, d), dtype=mean.dtype))(keys)
    deviation = jnp.einsum("cij,cnj->cni", root, xi)
    u = mean[:, None, :] + deviation
    with using_executor(engine.executor), limited_blas_threads(engine.blas_threads):
        outputs = jax.jit(problem.forward)(u)
    ok = jnp.all(jnp.isfinite(outputs), axis=-1)
    residual = jnp.where(ok[..., None], problem.observations - outputs, 0.0)
    phi = problem.noise.misfit(residual)
    log_q = -0.5 * jnp.sum(xi**2, axis=-1) - 0.5 * logdet[:, None]
    log_w = -0.5 * jnp.sum(u**2, axis=-1) - phi - log_q
    ok = ok & jnp.isfinite(log_w)
    log_w = jnp.where(ok, log_w, -jnp.inf)
    log_w = log_w - logsumexp(log_w, axis=1, keepdims=True)  # NaN rows: every draw failed
    w = jnp.exp(log_w)
    any_ok = jnp.any(ok, axis=1)
    ess = jnp.where(any_ok, 1.0 / jnp.sum(w**2, axis=1) / num_draws, 0.0)
    # from the deviations, not u: E_w[u] and ū differ by ~sd_q, which in float32 is lost
    # in rounding when |mean| >> sd_q (informative data: 1.5 sd_q of pure rounding)
    shift = jnp.einsum("cn,cni->ci", w, deviation) - deviation.mean(axis=1)
    sd = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))
    failed = np.asarray(num_draws - jnp.sum(ok, axis=1))
    if np.any(failed):
        warn(
            f"gaussian_approximation_check: the forward map failed for {failed.tolist()} "
            f"of the {num_draws} draws (per chain); they get zero weight, so the check "
            "describes the posterior where the model works"
            + (
                " (every draw failed on some chain: its ESS is 0)."
                if np.any(failed == num_draws)
                else "."
            )
        )
    ess = np.asarray(ess)
    return GaussianCheck(
        ess_fraction=ess,
        max_weight=np.asarray(w.max(axis=1)),
        mean_shift=np.asarray(jnp.max(jnp.abs(shift) / sd, axis=-1)),
        good=bool(np.all(ess >= threshold)),
        threshold=float(threshold),
        failed=failed,
    )

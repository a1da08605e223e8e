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
normalised weight), how far the weights move the draws' mean in u, in q's standard
deviations, and the same comparison for the parameters themselves (the draws mapped
through the prior transform): how far the weighted (posterior) mean and sd of every
latent element lie from q's, in posterior sds.

The last one matters where the prior transform is strongly nonlinear. On eight schools
UKI's q in u-space is too wide but overlaps the posterior well (ESS/n 0.45), while
HalfCauchy's quantile function turns that extra width into parameter means 6-34
posterior sds off and sds 29-1000 times too large (over three draw keys); the weights
see it, so ``value_shift`` is large (30 posterior sds, at tau) and ``good`` is False.
Where the ESS is not tiny, ``value_shift`` estimates the run's worst error in posterior
sds;
``benchmarks/gaussian_check_calibration.py`` measures both criteria against the
reference posteriors of the six reference models (the ESS alone called 21 of 31 runs
good that were more than 0.25 sd or 25 % off, eight schools UKI among them; with
``value_shift`` one, 0.27 off).

Limits (read before trusting a "good"):

- Importance sampling from a Gaussian whose tails are lighter than the posterior's
  (funnels, heavy-tailed scale priors) can *look* fine by chance: the missing mass is
  never sampled. A low ESS or a large shift is a reliable alarm; passing both is
  evidence, not proof.
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
from eki_infer.validation import check_count, is_real_scalar

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
        good: ess_fraction ≥ threshold and value_shift ≤ max_value_shift (all chains).
        threshold: the ESS fraction used for ``good``.
        failed: draws per chain where the forward map failed (given zero weight).
        value_shift: max over the latent sites' elements x (the draws mapped through the
            prior transform) of |E_w[x] − x̄| / sd_w and |sd(x) / sd_w − 1|, with sd_w the
            weighted (posterior) sd and x̄, sd(x) q's own: how far q's parameter moments
            are from the posterior's, in posterior sds (∞ where q's are not finite).
        worst_value: per chain, the element (``site`` or ``site[i, j]``) with that shift.
        max_value_shift: the largest ``value_shift`` called good.
    """

    ess_fraction: np.ndarray
    max_weight: np.ndarray
    mean_shift: np.ndarray
    good: bool
    threshold: float
    failed: np.ndarray
    value_shift: np.ndarray
    worst_value: tuple
    max_value_shift: float


def _gaussians(engine):
    """q's mean (chains, d) and covariance (chains, d, d) in whitened space."""
    state = engine.final_state
    if engine.method == "uki":
        return jnp.asarray(state.mean), jnp.asarray(state.cov)
    if engine.method not in ("eki", "eks"):
        raise ValueError(
            f"gaussian_approximation_check is for EKI, EKS and UKI runs, not "
            f"method={engine.method!r}: SMC's draws are already weighted to the posterior "
            "(its own diagnostics are the per-stage ESS and acceptance rates in the "
            "ensemble_history group and engine.history), and a Gaussian fitted to them "
            "says nothing about them."
        )
    u = jnp.asarray(state.particles)  # EKI/EKS ensembles: (chains, J, d)
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


def _value_shifts(problem, values, w, ok):
    """Per chain, the largest shift of q's parameter moments from the weighted ones (see
    :attr:`GaussianCheck.value_shift`) and the element it is at. ``values``: the prior
    transform of the draws (site: (chains, n, ...)); ``w``: normalised weights (chains, n);
    ``ok``: the draws whose forward run worked, the only ones either side counts.

    Computed in float64 on the host from deviations from one draw per chain: in float32,
    moments of values of size 1000 with a posterior sd of 1e-3 summed directly are
    rounding (an exact UKI run came out 0.66 sd "off")."""
    ok = np.asarray(ok)
    w = np.where(ok, np.asarray(w, dtype=np.float64), 0.0)
    columns, labels = [], []
    for site in problem.latent_sites:
        x = np.asarray(values[site.name], dtype=np.float64)
        columns.append(x.reshape((*x.shape[:2], -1)))
        labels += (
            [site.name]
            if not site.shape
            else [
                f"{site.name}[{', '.join(map(str, np.unravel_index(i, site.shape)))}]"
                for i in range(columns[-1].shape[-1])
            ]
        )
    x = np.concatenate(columns, axis=-1)  # (chains, n, P)
    first = np.argmax(ok, axis=1)  # a draw that worked, per chain (any, where none did)
    x = x - x[np.arange(x.shape[0]), first][:, None, :]
    x = np.where(ok[..., None], x, 0.0)
    count = np.maximum(ok.sum(axis=1), 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        weighted_mean = np.einsum("cn,cnp->cp", w, x)
        weighted_sd = np.sqrt(np.einsum("cn,cnp->cp", w, (x - weighted_mean[:, None]) ** 2))
        mean = x.sum(axis=1) / count
        deviation = np.where(ok[..., None], x - mean[:, None], 0.0)
        sd = np.sqrt((deviation**2).sum(axis=1) / count)
        shift = np.maximum(np.abs(mean - weighted_mean) / weighted_sd, np.abs(sd / weighted_sd - 1))
    shift = np.where(np.isnan(shift), np.inf, shift)  # q's moments not finite, or sd_w 0
    worst = np.argmax(shift, axis=-1)
    return shift.max(axis=-1), tuple(labels[i] for i in worst)


def gaussian_approximation_check(
    engine,
    rng_key=None,
    num_draws: int = 2000,
    threshold: float = 0.3,
    max_value_shift: float = 0.25,
) -> GaussianCheck:
    """Importance-sampling check of an EKI/EKS/UKI run's Gaussian against the exact
    posterior (see the module docstring for what it can and cannot tell).

    The forward runs go through the engine's executor (and BLAS thread limit), as the
    run's own did. Draws where the forward map fails get zero weight and are counted in
    ``failed`` (with a warning): the check then describes the posterior where the
    model works.

    Args:
        engine: a finished :class:`~eki_infer.EKIInference` with method EKI, EKS or UKI.
        rng_key: key for the draws (default PRNGKey(0)).
        num_draws: draws per chain (= forward evaluations per chain), at least 2.
        threshold: ESS fraction below which the approximation is called poor, in (0, 1].
        max_value_shift: the largest :attr:`GaussianCheck.value_shift` (posterior sds)
            called good, > 0: the accuracy asked for. ``value_shift`` is an
            importance-sampling estimate of how far q's parameter means and sds are from
            the posterior's, and it tracked the runs' real worst errors closely in
            ``benchmarks/gaussian_check_calibration.py`` (EKI and UKI on the six reference
            models, 54 runs): with the default 0.25, of the 31 runs more than 0.25 sd or
            25 % off one was called good (0.27 off), and of the 23 within it one was
            called poor.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    check_rng_key(rng_key)
    check_count("num_draws", num_draws, minimum=2)
    if not is_real_scalar(threshold) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    if not is_real_scalar(max_value_shift) or not float(max_value_shift) > 0.0:
        raise ValueError(f"max_value_shift must be a number > 0, got {max_value_shift!r}.")
    from eki_infer.inference import EKIInference

    if not isinstance(engine, EKIInference):
        raise TypeError(
            "gaussian_approximation_check takes the EKIInference engine of a finished run "
            f"(after engine.run(...)), got {type(engine).__name__}."
        )
    problem = engine.problem
    mean, cov = _gaussians(engine)
    d = mean.shape[-1]
    root, logdet = _square_roots(cov)
    keys = jax.random.split(rng_key, mean.shape[0])
    xi = jax.vmap(lambda k: jax.random.normal(k, (num_draws, d), dtype=mean.dtype))(keys)
    deviation = jnp.einsum("cij,cnj->cni", root, xi)
    u = mean[:, None, :] + deviation
    with using_executor(engine.executor), limited_blas_threads(engine.blas_threads):
        values, outputs = jax.jit(problem.transform_and_forward)(u)
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
    value_shift, worst = _value_shifts(problem, values, w, ok)
    value_shift = np.where(np.asarray(any_ok), value_shift, np.inf)
    return GaussianCheck(
        ess_fraction=ess,
        max_weight=np.asarray(w.max(axis=1)),
        mean_shift=np.asarray(jnp.max(jnp.abs(shift) / sd, axis=-1)),
        good=bool(np.all(ess >= threshold) and np.all(value_shift <= max_value_shift)),
        threshold=float(threshold),
        failed=failed,
        value_shift=value_shift,
        worst_value=worst,
        max_value_shift=float(max_value_shift),
    )

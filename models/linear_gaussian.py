"""Linear-Gaussian inverse problem (Bayesian linear regression with known noise).

What it is
    y = X θ + ε,  θ ~ N(m₀, S₀),  ε ~ N(0, Γ),  Γ = diag(σ²) known,
    with θ in R^d (site ``theta``, shape (d,)) and y in R^M (site ``y``, shape (M,)).
    :func:`simulate_data` draws a Gaussian design X (M × d, entries N(0, 1/d) so the
    signal is O(1) whatever d), uses an AR(1)-correlated prior S₀[i, j] = ρ^|i-j| with
    ρ = 0.5 (so the prior is not diagonal and the prior transform has to use its
    Cholesky factor), m₀ = 0 and per-datum noise scales σ (default 0.5 for all).

Source
    The textbook conjugate case (e.g. Kaipio & Somersalo 2005, ch. 3; Bishop 2006,
    §3.3); in the ensemble Kalman literature it is the case where EKI at time T = 1
    with an infinite ensemble is exact (Schillings & Stuart 2017; Iglesias, Law &
    Stuart 2013) and where EKS/ALDI's mean-field limit samples the posterior exactly.

Easy / hard for ensemble Kalman methods
    The easy case by construction: every ensemble Kalman update is a linear-Gaussian
    conditioning step, so the only errors are the finite-ensemble (sampling) error,
    the subspace property (an ensemble of J ≤ d members cannot leave its initial
    span: use J > d) and the time discretisation of the process. It is the exactness
    test of the package: :func:`exact_posterior` gives the posterior in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = [
    "TRUE_PARAMS",
    "exact_posterior",
    "forward",
    "model",
    "prior_covariance",
    "simulate_data",
]

TRUE_PARAMS = {"theta": np.array([1.0, -0.5, 0.25, 2.0, -1.5])}
"""Truth for the default d = 5; for another d, :func:`simulate_data` draws θ from the prior."""


def prior_covariance(d: int, rho: float = 0.5, dtype=None) -> jax.Array:
    """AR(1) prior covariance S₀[i, j] = ρ^|i - j| (d × d)."""
    i = jnp.arange(d)
    return jnp.asarray(rho, dtype=dtype) ** jnp.abs(i[:, None] - i[None, :])


def forward(theta, X):
    """Noise-free data X θ, shape (M,). Pure JAX, jit- and vmap-able over ``theta``."""
    return X @ theta


def model(X, prior_mean, prior_cov, noise_scale, y=None):
    """NumPyro model.

    ``X``: (M, d) design; ``prior_mean``: (d,); ``prior_cov``: (d, d);
    ``noise_scale``: (M,) known noise standard deviations (Γ = diag(noise_scale²));
    ``y``: (M,). Latent site ``theta`` (d,); observed site ``y`` (M,).
    """
    theta = numpyro.sample("theta", dist.MultivariateNormal(prior_mean, prior_cov))
    numpyro.sample("y", dist.Normal(forward(theta, X), noise_scale).to_event(1), obs=y)


def simulate_data(rng_key, d: int = 5, M: int = 20, noise_scale: float = 0.5, params=None):
    """Return ``(args, y)`` with ``args = (X, prior_mean, prior_cov, noise_scale)``.

    ``model(*args, y=y)`` is the conditioned model and ``exact_posterior(*args, y)``
    its posterior. The truth is ``params["theta"]`` if given, else ``TRUE_PARAMS``
    when d = 5, else a draw from the prior.
    """
    k_x, k_theta, k_eps = jax.random.split(rng_key, 3)
    X = jax.random.normal(k_x, (M, d)) / jnp.sqrt(d)
    prior_mean = jnp.zeros(d)
    prior_cov = prior_covariance(d)
    sigma = jnp.full((M,), noise_scale)
    if params is not None:
        theta = jnp.asarray(params["theta"])
    elif d == TRUE_PARAMS["theta"].shape[0]:
        theta = jnp.asarray(TRUE_PARAMS["theta"])
    else:
        theta = jax.random.multivariate_normal(k_theta, prior_mean, prior_cov)
    y = forward(theta, X) + sigma * jax.random.normal(k_eps, (M,))
    return (X, prior_mean, prior_cov, sigma), y


def exact_posterior(X, prior_mean, prior_cov, noise_scale, y):
    """Closed-form posterior mean (d,) and covariance (d, d) of ``theta`` (numpy, float64).

    Precision form: P = S₀⁻¹ + Xᵀ Γ⁻¹ X, mean = P⁻¹ (S₀⁻¹ m₀ + Xᵀ Γ⁻¹ y),
    evaluated with Cholesky solves in float64 whatever the inputs' dtype.
    """
    X = np.asarray(X, dtype=np.float64)
    m0 = np.asarray(prior_mean, dtype=np.float64)
    S0 = np.asarray(prior_cov, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    gamma_inv = 1.0 / np.broadcast_to(np.asarray(noise_scale, dtype=np.float64), y.shape) ** 2
    L0 = np.linalg.cholesky(S0)
    S0_inv = np.linalg.solve(L0.T, np.linalg.solve(L0, np.eye(S0.shape[0])))
    precision = S0_inv + X.T @ (gamma_inv[:, None] * X)
    L = np.linalg.cholesky(precision)
    cov = np.linalg.solve(L.T, np.linalg.solve(L, np.eye(S0.shape[0])))
    cov = 0.5 * (cov + cov.T)
    mean = cov @ (S0_inv @ m0 + X.T @ (gamma_inv * y))
    return mean, cov

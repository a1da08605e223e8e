"""Eight schools: the classic hierarchical model with known measurement errors.

What it is
    Estimated coaching effects y_j with known standard errors σ_j in J = 8 schools:

        mu ~ N(0, 5²),  tau ~ HalfCauchy(5),
        theta_j ~ N(mu, tau)        (plate "school"),
        y_j ~ N(theta_j, σ_j)       (σ_j known).

    :func:`model` is the centred parameterisation (latent ``mu``, ``tau``, ``theta``);
    :func:`model_noncentered` samples ``theta_tilde`` ~ N(0, 1) and records
    theta = mu + tau * theta_tilde as a deterministic site.

Source
    Rubin (1981); Gelman et al., "Bayesian Data Analysis", §5.5; the priors are the
    ones of the NumPyro and Stan examples. :func:`simulate_data` returns the classic
    data by default (``classic=True``); ``classic=False`` simulates y from
    ``TRUE_PARAMS`` instead (there is no "truth" for the real data).

Easy / hard for ensemble Kalman methods
    Easy: linear forward map (y = theta), Gaussian likelihood, ten latent values,
    with a whitening prior transform the non-centred form appears automatically.
    Hard: the posterior is the funnel: theta's spread is tau, and tau is weakly
    identified (heavy-tailed HalfCauchy prior, data compatible with tau ≈ 0), so the
    joint posterior of (tau, theta) is strongly non-Gaussian; in the whitened
    coordinates of the centred model (u_tau, u_theta) the map theta = mu + tau u is
    bilinear, and ensemble Kalman updates, Gaussian at heart, cannot represent the
    funnel, so the tau marginal is the quantity to watch. NUTS struggles with the
    centred form (divergences) and not with the non-centred one.
    No closed-form posterior.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = [
    "SIGMA",
    "TRUE_PARAMS",
    "Y",
    "forward",
    "model",
    "model_noncentered",
    "simulate_data",
]

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
"""The classic observed effects."""

SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
"""Their known standard errors."""

TRUE_PARAMS = {
    "mu": 4.0,
    "tau": 3.0,
    "theta": np.array([7.0, 4.5, 1.0, 4.0, 2.5, 3.0, 8.0, 5.0]),
}
"""Used only when ``simulate_data(..., classic=False)``: plausible values, not a truth."""


def forward(theta):
    """Noise-free data: the identity map theta -> theta (J,)."""
    return theta


def model(sigma, y=None):
    """Centred model. ``sigma``: (J,) known standard errors; ``y``: (J,).

    Latent sites ``mu``, ``tau`` (scalars) and ``theta`` (J,, plate "school");
    observed site ``y`` (J,, in the same plate).
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(forward(theta), sigma), obs=y)


def model_noncentered(sigma, y=None):
    """Non-centred model: latent ``mu``, ``tau``, ``theta_tilde`` (J,); deterministic
    ``theta = mu + tau * theta_tilde``; observed ``y``. Same posterior over (mu, tau, theta).
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(forward(theta), sigma), obs=y)


def simulate_data(rng_key, classic: bool = True, params=None):
    """Return ``(args, y)`` with ``args = (sigma,)``: ``model(*args, y=y)``.

    ``classic=True`` (default): the real data ``Y`` (``rng_key`` unused).
    ``classic=False``: y = theta + σ ε with theta from ``params`` or ``TRUE_PARAMS``.
    """
    sigma = jnp.asarray(SIGMA)
    if classic:
        return (sigma,), jnp.asarray(Y)
    p = dict(TRUE_PARAMS if params is None else params)
    theta = jnp.asarray(p["theta"])
    y = forward(theta) + sigma * jax.random.normal(rng_key, sigma.shape, sigma.dtype)
    return (sigma,), y

"""SIR epidemic ODE with positive, non-Gaussian priors.

What it is
    Fractions S + I + R = 1 of a closed population,

        dS/dt = -β S I,   dI/dt = β S I - γ I,   dR/dt = γ I,
        S(0) = 1 - i₀, I(0) = i₀, R(0) = 0,

    integrated by RK4 under ``lax.scan`` (``substeps`` equal steps between observation
    times, default 6 steps of half a day). Unknowns and priors:
    β ~ LogNormal(log 0.5, 0.5) (site ``beta``, contact rate per day),
    γ ~ Gamma(8, 40) (site ``gamma``, recovery rate per day, mean 0.2, sd 0.07),
    i₀ ~ Beta(2, 198) (site ``i0``, initial infected fraction, mean 0.01).
    Data: the infected fraction I(t) at 20 times t = 3, 6, ..., 60 days, with known
    Gaussian noise of standard deviation 0.01 (Γ = 10⁻⁴ I).

Source
    Kermack & McKendrick (1927); the standard compartmental-model calibration example
    of Bayesian workflow tutorials (e.g. Grinsztajn, Semenova, Margossian & Riou 2021,
    "Bayesian workflow for disease transmission modeling in Stan"), reduced here to
    Gaussian observation noise on the infected fraction so that the likelihood is the
    Gaussian one ensemble Kalman methods assume.

Easy / hard for ensemble Kalman methods
    Easy: three parameters, smooth ODE, cheap. Hard: every prior is non-Gaussian and
    bounded (LogNormal, Gamma, Beta; Gamma and Beta have no closed-form inverse CDF
    in NumPyro without TFP, so a whitening prior transform has to invert their CDFs
    numerically); the map is strongly nonlinear (exponential growth at rate β - γ,
    timing of the peak depends on log i₀); β and γ are correlated along the ridge of
    constant growth rate, and i₀ trades off against the growth rate, so the
    posterior is curved and skewed in the original coordinates. The posterior is
    narrow compared with the prior (β to about ±4 %), so an ensemble has to contract
    a lot. A local optimum where the epidemic burns out at once (β ≈ 8, γ ≈ 1.3,
    I ≈ 0 at every observation time, log density ~700 below the truth's) can catch
    NUTS started by ``init_to_uniform``; start NUTS with ``init_to_median``.
    No closed-form posterior.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = [
    "NOISE_SCALE",
    "TRUE_PARAMS",
    "default_times",
    "forward",
    "model",
    "simulate_data",
]

TRUE_PARAMS = {"beta": 0.4, "gamma": 0.2, "i0": 0.01}
"""Truth: R₀ = β/γ = 2, 1 % initially infected; the peak (I ≈ 0.16) is near day 21."""

NOISE_SCALE = 0.01
"""Known standard deviation of the noise on the observed infected fraction."""


def default_times(num_obs: int = 20, interval: float = 3.0, dtype=None) -> jax.Array:
    """Observation times ``interval * (1, ..., num_obs)`` in days."""
    return interval * jnp.arange(1, num_obs + 1, dtype=dtype)


def _rhs(state, beta, gamma):
    s, i, _ = state
    infection = beta * s * i
    recovery = gamma * i
    return jnp.stack([-infection, infection - recovery, recovery])


@partial(jax.jit, static_argnames=("substeps",))
def forward(beta, gamma, i0, times, substeps: int = 6):
    """Infected fraction I(t) at ``times`` (increasing, > 0), shape (len(times),).

    RK4 with ``substeps`` equal steps on each interval between consecutive times
    (starting from t = 0). Pure JAX; jit- and vmap-able over (β, γ, i₀) and ``times``.
    Jitted (``substeps`` is static) so that eager calls of the model are fast.
    """
    state0 = jnp.stack([1.0 - i0, i0, jnp.zeros_like(i0)])
    intervals = jnp.diff(times, prepend=jnp.zeros((1,), dtype=times.dtype))

    def rk4(state, h):
        k1 = _rhs(state, beta, gamma)
        k2 = _rhs(state + 0.5 * h * k1, beta, gamma)
        k3 = _rhs(state + 0.5 * h * k2, beta, gamma)
        k4 = _rhs(state + h * k3, beta, gamma)
        return state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def interval_step(state, dt):
        h = dt / substeps
        state = jax.lax.fori_loop(0, substeps, lambda _, s: rk4(s, h), state)
        return state, state[1]

    _, infected = jax.lax.scan(interval_step, state0, intervals)
    return infected


def model(times, noise_scale=NOISE_SCALE, y=None):
    """NumPyro model.

    ``times``: (T,) observation times in days (:func:`default_times`);
    ``noise_scale``: known noise standard deviation; ``y``: (T,) observed infected
    fractions. Latent sites ``beta``, ``gamma``, ``i0`` (scalars); observed ``y``.
    """
    beta = numpyro.sample("beta", dist.LogNormal(math.log(0.5), 0.5))
    gamma = numpyro.sample("gamma", dist.Gamma(8.0, 40.0))
    i0 = numpyro.sample("i0", dist.Beta(2.0, 198.0))
    infected = forward(beta, gamma, i0, times)
    numpyro.sample("y", dist.Normal(infected, noise_scale).to_event(1), obs=y)


def simulate_data(
    rng_key, num_obs: int = 20, interval: float = 3.0, noise_scale=NOISE_SCALE, params=None
):
    """Return ``(args, y)`` with ``args = (times, noise_scale)``: ``model(*args, y=y)``."""
    p = dict(TRUE_PARAMS if params is None else params)
    times = default_times(num_obs, interval)
    g = forward(p["beta"], p["gamma"], p["i0"], times)
    y = g + noise_scale * jax.random.normal(rng_key, g.shape, g.dtype)
    return (times, noise_scale), y

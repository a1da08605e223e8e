"""Exponential of a sinusoid: the EnsembleKalmanProcesses.jl scheduler study.

What it is
    Two unknowns, an ``amplitude`` A and a ``vertical_shift`` v, define the curve

        f(t) = exp(A sin(t) + v),   t in [0, 2π],

    and only two summaries of it are observed: y = [max_t f(t), mean_t f(t)] + η with
    η ~ N(0, Γ), Γ = 0.1 I₂ (known). Priors: A ~ N(2, 1), v ~ N(0, 5²).

Source
    EnsembleKalmanProcesses.jl, "Learning rate schedulers" documentation page and
    ``examples/LearningRateSchedulers/compare_schedulers.jl``: the same forward map on
    the grid ``t = 0:0.01:(2π + 0.01)`` (630 points, :func:`default_times`), Γ = 0.1 I,
    priors A ~ N(2, 1) and v ~ N(0, 5²) (the docs write the variance, N(0, 25)), and the
    truth ``u_true = [1.0, 0.8]``, used here as ``TRUE_PARAMS``.
    Two differences from the Julia script, both deliberate: the EKP amplitude prior is
    ``constrained_gaussian("amplitude", 2, 1, 0, Inf)`` (a positive, log-normal-like
    prior), while this model uses the plain N(2, 1) the docs quote; and the observed
    data are a fresh draw of the noise, not the Julia RNG stream.

Easy / hard for ensemble Kalman methods
    Easy: two parameters, two data, a smooth and cheap map; EKI with ~50 members
    converges in 10-20 DataMisfitController steps. Hard: the map is strongly
    nonlinear (exponential in both parameters, so prior draws span ~e^±15 in output
    scale and the first steps need a small Δt, which is exactly what the scheduler
    study probes), and both observables are even in A (max f = exp(|A| + v) and
    mean f = e^v I₀(A) up to the grid), so the posterior has a mirror mode at -A.
    With the truth above the mirror mode holds ~2% of the posterior mass (the prior
    N(2, 1) tips the balance); a Gaussian ensemble update cannot represent it, and a
    single NUTS chain may get stuck in it (seed-dependent), so compare against
    :func:`exact_posterior` or several chains.

Reference posterior
    No closed form, but with two parameters the posterior moments are computed to
    near machine precision by quadrature on a grid (:func:`exact_posterior`), using
    the separable structure of the two observables.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = [
    "NOISE_VARIANCE",
    "TRUE_PARAMS",
    "default_times",
    "exact_posterior",
    "forward",
    "model",
    "simulate_data",
]

TRUE_PARAMS = {"amplitude": 1.0, "vertical_shift": 0.8}
"""Truth used by EKP's scheduler study (``u_true = [1.0, 0.8]``)."""

NOISE_VARIANCE = 0.1
"""Γ = 0.1 I₂ (known observation noise variance)."""


def default_times(dt: float = 0.01, dtype=None) -> jax.Array:
    """EKP's time grid ``0:dt:(2π + dt)`` (630 points for dt = 0.01)."""
    n = math.floor((2.0 * math.pi + dt) / dt + 1e-9) + 1
    return jnp.arange(n, dtype=dtype) * dt


def forward(amplitude, vertical_shift, t):
    """Noise-free observable ``[max f, mean f]`` for f(t) = exp(A sin t + v), shape (2,).

    Pure JAX; jit- and vmap-able over the parameters (scalars) and the dtype follows
    the inputs.
    """
    f = jnp.exp(amplitude * jnp.sin(t) + vertical_shift)
    return jnp.stack([jnp.max(f), jnp.mean(f)])


def model(t=None, y=None):
    """NumPyro model. ``t``: time grid (default :func:`default_times`); ``y``: shape (2,).

    Latent sites ``amplitude`` and ``vertical_shift`` (scalars); observed site ``y``
    (shape (2,)), Normal with known scale sqrt(0.1) per component (Γ = 0.1 I₂).
    """
    if t is None:
        t = default_times()
    amplitude = numpyro.sample("amplitude", dist.Normal(2.0, 1.0))
    vertical_shift = numpyro.sample("vertical_shift", dist.Normal(0.0, 5.0))
    g = forward(amplitude, vertical_shift, t)
    numpyro.sample("y", dist.Normal(g, math.sqrt(NOISE_VARIANCE)).to_event(1), obs=y)


def simulate_data(rng_key, dt: float = 0.01, params=None):
    """Return ``(args, y)``: ``args = (t,)`` and ``y`` of shape (2,), so that
    ``model(*args, y=y)`` is the conditioned model. ``params`` overrides ``TRUE_PARAMS``.
    """
    p = dict(TRUE_PARAMS if params is None else params)
    t = default_times(dt)
    g = forward(p["amplitude"], p["vertical_shift"], t)
    y = g + math.sqrt(NOISE_VARIANCE) * jax.random.normal(rng_key, g.shape, g.dtype)
    return (t,), y


def _log_posterior_grid(t, y, a, v):
    """Unnormalised log posterior on the outer grid ``a`` x ``v`` (numpy, float64)."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    s = np.sin(t)
    # max_t exp(a s + v) = exp(v + max_t(a s)); mean_t exp(a s + v) = e^v mean_t exp(a s).
    log_max = np.maximum(a * s.max(), a * s.min())[:, None] + v[None, :]
    log_mean_a = np.log(np.mean(np.exp(a[:, None] * s[None, :]), axis=1))
    g_max = np.exp(log_max)
    g_mean = np.exp(log_mean_a[:, None] + v[None, :])
    misfit = ((g_max - y[0]) ** 2 + (g_mean - y[1]) ** 2) / (2.0 * NOISE_VARIANCE)
    log_prior = -0.5 * (a[:, None] - 2.0) ** 2 - 0.5 * (v[None, :] / 5.0) ** 2
    return log_prior - misfit


def exact_posterior(t, y, grid_size: int = 1501, main_mode_only: bool = False):
    """Posterior mean (2,) and covariance (2, 2), order ``[amplitude, vertical_shift]``.

    Computed by quadrature (numpy, float64): a coarse grid over the prior's bulk locates
    the posterior mass (both mirror modes), then a ``grid_size``² grid over that box
    integrates the moments. Accurate to ~1e-8 for the default problem. The moments are
    those of the whole (bimodal) posterior; ``main_mode_only=True`` gives those of the
    posterior restricted to amplitude > 0, the mode the prior favours.
    """
    a = np.linspace(-6.0, 10.0, 1601)
    v = np.linspace(-25.0, 25.0, 2001)
    for _ in range(2):
        lp = _log_posterior_grid(t, y, a, v)
        keep = lp > lp.max() - 60.0
        ia, iv = np.nonzero(keep.any(axis=1))[0], np.nonzero(keep.any(axis=0))[0]
        da, dv = a[1] - a[0], v[1] - v[0]
        a = np.linspace(a[ia[0]] - 2 * da, a[ia[-1]] + 2 * da, grid_size)
        v = np.linspace(v[iv[0]] - 2 * dv, v[iv[-1]] + 2 * dv, grid_size)
    lp = _log_posterior_grid(t, y, a, v)
    w = np.exp(lp - lp.max())
    A, V = np.meshgrid(a, v, indexing="ij")
    if main_mode_only:
        w = w * (A > 0)
    w /= w.sum()
    mean = np.array([np.sum(w * A), np.sum(w * V)])
    da, dv = A - mean[0], V - mean[1]
    cov = np.array(
        [
            [np.sum(w * da * da), np.sum(w * da * dv)],
            [np.sum(w * da * dv), np.sum(w * dv * dv)],
        ]
    )
    return mean, cov

"""Single-scale Lorenz-96 with linear damping: forcing and damping from statistics.

What it is
    K slow variables on a ring (default K = 8),

        dx_k/dt = (x_{k+1} - x_{k-2}) x_{k-1} - c x_k + F,

    with unknown forcing F (site ``forcing``, prior N(8, 2²)) and linear damping c
    (site ``damping``, prior LogNormal(0, 0.5), positive). The data are statistics of
    the slow variables: for each k, the time mean of x_k and the time mean of x_k²
    (2K numbers, ``[means..., second moments...]``), averaged over a fixed set of
    ``n_ic`` initial states (default 16), each integrated with RK4 (Δt = 0.05,
    ``lax.scan``) for a spin-up of ``spinup_steps`` (default 10 steps = 0.5 time units)
    and then averaged over a window of ``window_steps`` (default 30 steps = 1.5 time
    units).

    The initial states are drawn by :func:`simulate_data` from a long run at the truth
    (so they lie on the true attractor) and are passed to the model as data, like the
    noise. The noise is known: Γ = diag(v), where v is the variance of the same
    statistics over 200 independent sets of ``n_ic`` initial states from that long run
    (internal variability of the finite-time statistics); it is computed once in
    :func:`simulate_data` and passed to the model. y = G(F†, c†) + N(0, Γ).

Source
    Lorenz (1996), "Predictability: a problem partly solved"; the calibration of
    Lorenz-96 from time-averaged statistics with Γ from internal variability follows
    Cleary, Garbuno-Inigo, Lan, Schneider & Stuart (2021), "Calibrate, emulate,
    sample", and the EnsembleKalmanProcesses.jl Lorenz examples, here shortened (see
    below) and reduced to the single-scale model with a damping parameter.

Integration length
    Gradients of long-time averages of a chaotic system grow like e^{λT} (λ ≈ 1.6 per
    time unit at F = 8, K = 8), which makes the likelihood surface rough at scales far below
    the posterior width and NUTS hopeless. The default spin-up + window of 2 time
    units keeps tangent-linear growth moderate so that NUTS (500 + 500, one chain)
    runs in well under a minute; the price is that the statistics are short-horizon
    ensemble statistics started on the true attractor rather than climate statistics.
    Longer windows are available through the arguments, for EKI-only studies.

Easy / hard for ensemble Kalman methods
    Easy: two parameters, a cheap and smooth-enough map, data that respond nearly
    linearly to F near the truth. Hard: the map is chaotic; the response to (F, c) is
    nonlinear (the scaling x -> c x, t -> t / c makes F and c partly confounded, a
    curved ridge); prior draws with large F are strongly chaotic, and with longer
    windows the map turns noisy, where ensemble methods (statistical linearisation
    over the ensemble) keep working and gradient-based samplers do not. With small
    damping the short window barely moves the states away from their (true)
    initial values, which makes a local optimum near (F, c) ≈ (3, 0.2) with a log
    density ~75 below the truth's; NUTS started by ``init_to_uniform`` can end there,
    so start it with ``init_to_median``.
    No closed-form posterior.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = [
    "DT",
    "TRUE_PARAMS",
    "forward",
    "model",
    "rhs",
    "simulate_data",
    "statistics",
]

TRUE_PARAMS = {"forcing": 8.0, "damping": 1.0}
"""The classic chaotic regime F = 8 with unit damping."""

DT = 0.05
"""RK4 time step (Lorenz 1996 used 0.05)."""


def rhs(x, forcing, damping):
    """Lorenz-96 tendency for state ``x`` of shape (..., K)."""
    return (
        (jnp.roll(x, -1, axis=-1) - jnp.roll(x, 2, axis=-1)) * jnp.roll(x, 1, axis=-1)
        - damping * x
        + forcing
    )


def _rk4_step(x, forcing, damping, dt):
    k1 = rhs(x, forcing, damping)
    k2 = rhs(x + 0.5 * dt * k1, forcing, damping)
    k3 = rhs(x + 0.5 * dt * k2, forcing, damping)
    k4 = rhs(x + dt * k3, forcing, damping)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def integrate(x0, forcing, damping, num_steps: int, dt: float = DT):
    """RK4 from ``x0`` (..., K) for ``num_steps`` steps; returns the final state."""

    def step(x, _):
        return _rk4_step(x, forcing, damping, dt), None

    x, _ = jax.lax.scan(step, x0, None, length=num_steps)
    return x


def statistics(x0, forcing, damping, spinup_steps: int, window_steps: int, dt: float = DT):
    """Window statistics ``[mean x_k, mean x_k²]`` (2K,) averaged over the initial states.

    ``x0``: (n_ic, K) initial states. After ``spinup_steps`` RK4 steps, the time means
    of x_k and x_k² over the next ``window_steps`` steps (end points of each step)
    are averaged over the ``n_ic`` members.
    """
    x = integrate(x0, forcing, damping, spinup_steps, dt)

    def step(carry, _):
        x, s1, s2 = carry
        x = _rk4_step(x, forcing, damping, dt)
        return (x, s1 + x, s2 + x * x), None

    zeros = jnp.zeros_like(x)
    (_, s1, s2), _ = jax.lax.scan(step, (x, zeros, zeros), None, length=window_steps)
    n = window_steps * x0.shape[0]
    return jnp.concatenate([s1.sum(axis=0) / n, s2.sum(axis=0) / n])


@partial(jax.jit, static_argnames=("spinup_steps", "window_steps"))
def forward(forcing, damping, x0, spinup_steps: int = 10, window_steps: int = 30):
    """Noise-free data G(F, c), shape (2K,). Pure JAX, jit- and vmap-able over (F, c).

    Jitted (the step counts are static) so that eager calls of the model are fast.
    """
    return statistics(x0, forcing, damping, spinup_steps, window_steps)


def model(x0, noise_var, y=None, spinup_steps: int = 10, window_steps: int = 30):
    """NumPyro model.

    ``x0``: (n_ic, K) initial states; ``noise_var``: (2K,) known variances (Γ diagonal);
    ``y``: (2K,). Latent sites ``forcing`` and ``damping`` (scalars); observed ``y``.
    ``spinup_steps``/``window_steps`` are static integers (keep them at the values
    used by :func:`simulate_data`).
    """
    forcing = numpyro.sample("forcing", dist.Normal(8.0, 2.0))
    damping = numpyro.sample("damping", dist.LogNormal(0.0, 0.5))
    g = forward(forcing, damping, x0, spinup_steps, window_steps)
    numpyro.sample("y", dist.Normal(g, jnp.sqrt(noise_var)).to_event(1), obs=y)


def simulate_data(
    rng_key,
    K: int = 8,
    n_ic: int = 16,
    spinup_steps: int = 10,
    window_steps: int = 30,
    num_noise_sets: int = 200,
    params=None,
):
    """Return ``(args, y)`` with ``args = (x0, noise_var)``: ``model(*args, y=y)``.

    ``n_ic * (num_noise_sets + 1)`` independent states on the true attractor are made
    by integrating as many randomly perturbed rest states (x = F/c + N(0, 1)) for 20
    time units at the truth (about 30 Lyapunov times: the states are effectively
    independent draws from the invariant measure). The first ``n_ic`` become ``x0``;
    the rest form ``num_noise_sets`` independent sets whose statistics give
    Γ = diag(variance). ``y`` is G(truth) plus a N(0, Γ) draw. If you change
    ``spinup_steps``/``window_steps``, pass the same values to the model.
    """
    p = dict(TRUE_PARAMS if params is None else params)
    return _simulate(
        rng_key, p["forcing"], p["damping"], K, n_ic, spinup_steps, window_steps, num_noise_sets
    )


@partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _simulate(rng_key, forcing, damping, K, n_ic, spinup_steps, window_steps, num_noise_sets):
    k_init, k_noise = jax.random.split(rng_key)
    num_states = n_ic * (num_noise_sets + 1)
    x = forcing / damping + jax.random.normal(k_init, (num_states, K))
    states = integrate(x, forcing, damping, round(20.0 / DT))
    sets = states.reshape(num_noise_sets + 1, n_ic, K)
    x0 = sets[0]
    stats = jax.vmap(lambda s: statistics(s, forcing, damping, spinup_steps, window_steps))(
        sets[1:]
    )
    noise_var = jnp.var(stats, axis=0, ddof=1)
    g = statistics(x0, forcing, damping, spinup_steps, window_steps)
    y = g + jnp.sqrt(noise_var) * jax.random.normal(k_noise, g.shape, g.dtype)
    return (x0, noise_var), y

"""Linear-Gaussian test problems with closed-form posteriors, and a minimal test loop.

G(u) = A u + b on whitened parameters u ~ N(0, I_d), y = G(u_true) + noise, Γ one of
the four noise structures. The posterior of any Gaussian prior N(m0, C0) is given by
the Kalman formulas in dense form (fine at test sizes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from eki_infer.noise import DenseNoise, DiagonalNoise, LowRankNoise, ScalarNoise
from eki_infer.processes import check_failures

NOISE_KINDS = ("scalar", "diagonal", "dense", "lowrank")


def make_noise(kind: str, dim: int, rng: np.random.Generator, scale: float = 0.3):
    """A noise object of the given structure and its dense covariance."""
    if kind == "scalar":
        noise = ScalarNoise(scale**2, dim)
    elif kind == "diagonal":
        noise = DiagonalNoise((scale * rng.uniform(0.5, 1.5, dim)) ** 2)
    elif kind == "dense":
        f = rng.normal(size=(dim, dim)) * scale / np.sqrt(dim)
        noise = DenseNoise(f @ f.T + scale**2 * np.eye(dim))
    elif kind == "lowrank":
        factor = rng.normal(size=(dim, 2)) * scale
        noise = LowRankNoise(factor, (scale * rng.uniform(0.5, 1.5, dim)) ** 2)
    else:
        raise ValueError(kind)
    return noise, np.asarray(noise.to_dense())


def kalman_posterior(a, b, y, gamma, m0, c0):
    """Posterior mean and covariance of u ~ N(m0, c0) given y = A u + b + N(0, Γ)."""
    s = a @ c0 @ a.T + gamma
    k = np.linalg.solve(s, a @ c0).T  # c0 Aᵀ S⁻¹
    mean = m0 + k @ (y - a @ m0 - b)
    cov = c0 - k @ a @ c0
    return mean, 0.5 * (cov + cov.T)


@dataclass
class LinearProblem:
    """y = A u + b + N(0, Γ) with prior u ~ N(0, I)."""

    a: np.ndarray
    b: np.ndarray
    y: np.ndarray
    noise: object
    gamma: np.ndarray

    @property
    def dim(self) -> int:
        return self.a.shape[1]

    @property
    def data_dim(self) -> int:
        return self.a.shape[0]

    def forward(self, u):
        """Batched forward map: ``(..., d) -> (..., M)``."""
        return u @ jnp.asarray(self.a).T + jnp.asarray(self.b)

    def posterior(self, m0=None, c0=None):
        d = self.dim
        m0 = np.zeros(d) if m0 is None else np.asarray(m0)
        c0 = np.eye(d) if c0 is None else np.asarray(c0)
        return kalman_posterior(self.a, self.b, self.y, self.gamma, m0, c0)


def make_problem(seed=0, dim=3, data_dim=5, noise="diagonal", shift=0.0, noise_scale=0.3):
    """A random well-posed linear problem; ``shift`` moves the data far from the prior
    predictive (in units of the noise scale)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(data_dim, dim))
    b = rng.normal(size=data_dim) * 0.1
    noise_obj, gamma = make_noise(noise, data_dim, rng, noise_scale)
    u_true = rng.normal(size=dim)
    y = a @ u_true + b + rng.multivariate_normal(np.zeros(data_dim), gamma)
    y = y + shift * noise_scale
    return LinearProblem(a, b, y, noise_obj, gamma)


def linear_forward(u, a, b):
    """Batched linear forward map ``(..., d) -> (..., M)``."""
    return u @ a.T + b


@functools.cache
def _iteration(process, scheduler, forward):
    """One jitted loop iteration, cached so tests sharing a process reuse the compilation."""

    @jax.jit
    def iteration(key, state, sched_state, a, b, y, noise):
        pts = process.points(state)
        g = forward(pts, a, b)
        failed = ~jnp.all(jnp.isfinite(g), axis=-1)
        r = noise.whiten(jnp.where(failed[:, None], y, g) - y)
        dt, sched_state = scheduler.next(sched_state, r, ~failed)
        new = process.update(key, state, g, failed, y, noise, dt)
        return new, sched_state, dt, failed

    return iteration


@functools.cache
def jitted(fn, **static):
    """``jax.jit(fn)`` cached by function identity (keyword arguments are bound statically)."""
    return jax.jit(functools.partial(fn, **static) if static else fn)


@functools.cache
def jitted_init(process):
    """``process.init`` jitted with a static dimension."""
    return jax.jit(process.init, static_argnums=1)


def run_process(
    process, scheduler, problem, rng_key, max_iterations=100, forward=None, record=False
):
    """Minimal driver: evaluate, check failures, ask the scheduler, update; repeat.

    ``forward(u, a, b)`` defaults to the linear map. Returns ``(state, info)`` where info
    holds the list of ``dts``, the final scheduler state, per-iteration failure counts
    and (if ``record``) the list of states after each update.
    """
    iteration = _iteration(process, scheduler, linear_forward if forward is None else forward)
    args = (jnp.asarray(problem.a), jnp.asarray(problem.b), jnp.asarray(problem.y), problem.noise)
    k_init, key = jax.random.split(rng_key)
    state = jitted_init(process)(k_init, problem.dim)
    sched_state = scheduler.init()
    info = {"dts": [], "failures": [], "states": []}
    for it in range(max_iterations):
        key, sub = jax.random.split(key)
        new, new_sched, dt, failed = iteration(sub, state, sched_state, *args)
        info["failures"].append(check_failures(failed, it))
        dt = float(dt)
        if not np.isfinite(dt):
            raise FloatingPointError(f"Iteration {it}: the scheduler returned a degenerate step.")
        if dt == 0.0:
            break
        state, sched_state = new, new_sched
        info["dts"].append(dt)
        if record:
            info["states"].append(state)
        if bool(sched_state.done):
            break
    info["scheduler_state"] = sched_state
    return state, info

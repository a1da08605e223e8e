"""EKS/ALDI: agreement with the dense update for every noise structure and both solve
paths (d ≤ J, Woodbury for d > J), equilibrium accuracy of ALDI, under-dispersion of
plain EKS at small J, and Δt = 0.

Equilibrium settings (measured; see eki_infer.schedulers' docstring): d = 2, M = 4,
J = 10, EKSStableScheduler(numerator=0.1), 1 200 iterations, the first 300 discarded,
the remaining ensembles pooled with weights Δt (a time average: the stable scheduler's
Δt depends on the ensemble, and an unweighted average over iterations over-weights the
small-step states, inflating variances by about 10 % at J = 10).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _linear import NOISE_KINDS, jitted, linear_forward, make_problem, run_process

from eki_infer.processes import eks, eks_update
from eki_infer.processes.base import implicit_solve
from eki_infer.schedulers import EKSStableScheduler

ALDI_10 = eks(10)
EKS_10 = eks(10, aldi=False)
SCHEDULER = EKSStableScheduler(numerator=0.1)


def forward(problem, u):
    return jitted(linear_forward)(u, jnp.asarray(problem.a), jnp.asarray(problem.b))


def dense_eks_update(u, g, y, gamma, dt, xi, aldi):
    """ALGORITHMS.md §4 with dense matrices, 1/J covariances and prior N(0, I)."""
    u, g, xi = np.asarray(u), np.asarray(g), np.asarray(xi)
    j, d = u.shape
    du, dg = u - u.mean(0), g - g.mean(0)
    c = du.T @ du / j
    dmat = np.linalg.solve(gamma, (g - y).T).T @ dg.T / j  # D[j, k] = 1/J <dg_k, Γ⁻¹(g_j − y)>
    rhs = u - dt * dmat @ du
    if aldi:
        rhs = rhs + dt * (d + 1) / j * du
    ustar = np.linalg.solve(np.eye(d) + dt * c, rhs.T).T
    return ustar + np.sqrt(2 * dt) * xi @ du / np.sqrt(j)


@pytest.mark.parametrize(
    ("noise", "dim", "ensemble", "aldi"),
    [(kind, 3, 6, True) for kind in NOISE_KINDS]
    + [("dense", 8, 5, True), ("diagonal", 3, 6, False)],
)
def test_update_matches_dense_formula(noise, dim, ensemble, aldi):
    problem = make_problem(seed=21, dim=dim, data_dim=4, noise=noise)
    u = jax.random.normal(jax.random.PRNGKey(1), (ensemble, dim))
    g = forward(problem, u)
    key, dt = jax.random.PRNGKey(2), 0.23
    new = jitted(eks_update, aldi=aldi)(key, u, g, jnp.asarray(problem.y), problem.noise, dt)
    k_noise, _ = jax.random.split(key)
    xi = jax.random.normal(k_noise, (ensemble, ensemble))
    ref = dense_eks_update(u, g, problem.y, problem.gamma, dt, xi, aldi)
    np.testing.assert_allclose(new, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("ensemble", "dim"), [(8, 3), (3, 8)])
def test_implicit_solve_both_paths(ensemble, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ensemble, dim))
    rhs = rng.normal(size=(4, dim))
    out = jitted(implicit_solve)(jnp.asarray(x), 0.7, jnp.asarray(rhs))
    ref = np.linalg.solve(np.eye(dim) + 0.7 * x.T @ x, rhs.T).T
    np.testing.assert_allclose(out, ref, rtol=1e-11)


@functools.cache
def pooled_moments(process, seed, iterations=1200, burn=300):
    problem = make_problem(seed=3, dim=2, data_dim=4, noise="diagonal")
    key = jax.random.PRNGKey(seed)
    _, info = run_process(process, SCHEDULER, problem, key, max_iterations=iterations, record=True)
    u = np.stack([np.asarray(s.particles) for s in info["states"]])[burn:]
    w = np.asarray(info["dts"])[burn:]
    w = np.broadcast_to(w[:, None], u.shape[:2]).reshape(-1)
    w = w / w.sum()
    pool = u.reshape(-1, u.shape[-1])
    mean = w @ pool
    var = w @ (pool - mean) ** 2
    return mean, var, info


def test_aldi_equilibrium_matches_posterior():
    mean, cov = make_problem(seed=3, dim=2, data_dim=4, noise="diagonal").posterior()
    sd = np.sqrt(np.diag(cov))
    m, v, info = pooled_moments(ALDI_10, 2)
    assert sum(info["dts"]) > 50  # many relaxation times (the posterior's scale is O(1))
    assert np.all(np.abs(m - mean) < 0.2 * sd)
    assert np.all(np.abs(np.sqrt(v) / sd - 1.0) < 0.15)


def test_plain_eks_is_under_dispersed_at_small_ensemble():
    _, cov = make_problem(seed=3, dim=2, data_dim=4, noise="diagonal").posterior()
    _, v_eks, _ = pooled_moments(EKS_10, 2)
    _, v_aldi, _ = pooled_moments(ALDI_10, 2)
    ratio_eks = v_eks / np.diag(cov)
    ratio_aldi = v_aldi / np.diag(cov)
    assert np.all(ratio_eks < 0.9)
    assert np.all(ratio_eks < 0.9 * ratio_aldi)


def test_zero_step_leaves_ensemble_unchanged():
    problem = make_problem(seed=21, dim=3, data_dim=4, noise="diagonal")  # compiled above
    u = jax.random.normal(jax.random.PRNGKey(8), (6, 3))
    g = forward(problem, u)
    new = jitted(eks_update, aldi=True)(
        jax.random.PRNGKey(9), u, g, jnp.asarray(problem.y), problem.noise, 0.0
    )
    np.testing.assert_array_equal(new, u)


def test_options_are_validated():
    with pytest.raises(ValueError, match="ensemble_size"):
        eks(0)

"""EKI: the transform variant's exactness, the perturbed variant's sampling accuracy,
agreement with the dense formulas for every noise structure, Δt = 0, and jit/vmap
across a chain axis (for all three processes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _linear import (
    NOISE_KINDS,
    jitted,
    kalman_posterior,
    linear_forward,
    make_problem,
    run_process,
)

from eki_infer.processes import eki, eki_perturbed_update, eki_transform_update, eks, uki
from eki_infer.schedulers import DataMisfitController

PERTURBED_BIG = eki(2000)


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def forward(problem, u):
    return jitted(linear_forward)(u, jnp.asarray(problem.a), jnp.asarray(problem.b))


def empirical(u):
    u = np.asarray(u)
    mean = u.mean(0)
    return mean, (u - mean).T @ (u - mean) / len(u)  # the package's 1/J normalisation


STEPS = {
    "one": [1.0],
    "two": [0.3, 0.7],
    "ten": list(np.random.default_rng(5).dirichlet(np.ones(10))),
}


@pytest.mark.parametrize("steps", STEPS.values(), ids=STEPS.keys())
@pytest.mark.parametrize(("dim", "ensemble", "noise"), [(3, 8, "diagonal"), (5, 4, "dense")])
def test_transform_matches_kalman_posterior_of_initial_ensemble(steps, dim, ensemble, noise):
    # With the prior replaced by the empirical Gaussian N(ū, C_J) of the initial ensemble,
    # the transform update is exact for a linear G — also when J ≤ d (singular C_J).
    problem = make_problem(seed=11, dim=dim, data_dim=6, noise=noise)
    u = jax.random.normal(jax.random.PRNGKey(3), (ensemble, dim))
    m0, c0 = empirical(u)
    mean, cov = kalman_posterior(problem.a, problem.b, problem.y, problem.gamma, m0, c0)
    update = jitted(eki_transform_update)
    y = jnp.asarray(problem.y)
    for dt in steps:
        u = update(jax.random.PRNGKey(0), u, forward(problem, u), y, problem.noise, dt)
    m1, c1 = empirical(u)
    assert rel(m1, mean) < 1e-8
    assert rel(c1, cov) < 1e-8


def test_perturbed_samples_the_posterior_at_large_ensemble():
    problem = make_problem(seed=12, dim=3, data_dim=5, noise="dense", shift=3.0)
    mean, cov = problem.posterior()
    sd = np.sqrt(np.diag(cov))
    state, info = run_process(PERTURBED_BIG, DataMisfitController(), problem, jax.random.PRNGKey(4))
    assert abs(sum(info["dts"]) - 1.0) < 1e-12
    m1, c1 = empirical(state.particles)
    assert np.all(np.abs(m1 - mean) < 0.15 * sd)
    assert np.all(np.abs(np.sqrt(np.diag(c1)) / sd - 1.0) < 0.10)


def dense_eki_update(u, g, y, gamma, dt, eta=None):
    """u + C^{uG}(C^{GG} + Γ/Δt)⁻¹(y + η − g) with dense matrices and 1/J covariances."""
    u, g = np.asarray(u), np.asarray(g)
    du, dg = u - u.mean(0), g - g.mean(0)
    cug, cgg = du.T @ dg / len(u), dg.T @ dg / len(u)
    innov = y - g if eta is None else y + eta - g
    return u + np.linalg.solve(cgg + gamma / dt, innov.T).T @ cug.T


@pytest.mark.parametrize(
    ("noise", "ensemble", "data_dim"),
    [(kind, 6, 10) for kind in NOISE_KINDS] + [("dense", 20, 5)],
)
def test_perturbed_update_matches_dense_formula(noise, ensemble, data_dim):
    # (6, 10): J ≤ M, J × J solve; (20, 5): M < J, M × M solve.
    problem = make_problem(seed=13, dim=3, data_dim=data_dim, noise=noise)
    u = jax.random.normal(jax.random.PRNGKey(5), (ensemble, 3))
    g = forward(problem, u)
    key, dt = jax.random.PRNGKey(6), 0.37
    new = jitted(eki_perturbed_update)(key, u, g, jnp.asarray(problem.y), problem.noise, dt)
    # the documented draw: ξ = normal(k_obs, (J, M)), η = W⁻¹ ξ / √Δt
    k_obs, _ = jax.random.split(key)
    xi = jax.random.normal(k_obs, g.shape)
    eta = np.asarray(problem.noise.unwhiten(xi)) / np.sqrt(dt)
    ref = dense_eki_update(u, g, problem.y, problem.gamma, dt, eta)
    np.testing.assert_allclose(new, ref, rtol=1e-9, atol=1e-11)


def test_transform_update_matches_dense_kalman_moments():
    problem = make_problem(seed=14, dim=4, data_dim=7, noise="lowrank")
    u = jax.random.normal(jax.random.PRNGKey(7), (9, 4))
    g = forward(problem, u)
    dt = 0.6
    key = jax.random.PRNGKey(0)
    new = jitted(eki_transform_update)(key, u, g, jnp.asarray(problem.y), problem.noise, dt)
    # mean: the dense Kalman mean update; covariance: C − C^{uG}(C^{GG} + Γ/Δt)⁻¹ C^{Gu}
    m0, c0 = empirical(u)
    du, dg = np.asarray(u) - m0, np.asarray(g) - np.asarray(g).mean(0)
    cug, cgg = du.T @ dg / 9, dg.T @ dg / 9
    gain = np.linalg.solve(cgg + problem.gamma / dt, cug.T).T
    mean_ref = m0 + gain @ (problem.y - np.asarray(g).mean(0))
    m1, c1 = empirical(new)
    np.testing.assert_allclose(m1, mean_ref, rtol=1e-10)
    np.testing.assert_allclose(c1, c0 - gain @ cug.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("update", "ensemble", "problem"),
    [  # the shapes of tests above, so the compilations are reused
        (eki_perturbed_update, 6, dict(seed=13, dim=3, data_dim=10, noise="scalar")),
        (eki_transform_update, 8, dict(seed=11, dim=3, data_dim=6, noise="diagonal")),
    ],
)
def test_zero_step_leaves_ensemble_unchanged(update, ensemble, problem):
    problem = make_problem(**problem)
    u = jax.random.normal(jax.random.PRNGKey(8), (ensemble, 3))
    g = forward(problem, u)
    new = jitted(update)(jax.random.PRNGKey(9), u, g, jnp.asarray(problem.y), problem.noise, 0.0)
    np.testing.assert_array_equal(new, u)


def test_options_are_validated():
    with pytest.raises(ValueError, match="variant"):
        eki(10, variant="square-root")
    with pytest.raises(ValueError, match="ensemble_size"):
        eki(1)
    with pytest.raises(ValueError, match="ensemble_size"):
        eki(10.5)


CHAIN_PROCESSES = {
    "eki-perturbed": eki(6),
    "eki-transform": eki(6, "transform"),
    "eks": eks(6),
    "uki": uki(),
}


@pytest.mark.parametrize("process", CHAIN_PROCESSES.values(), ids=CHAIN_PROCESSES.keys())
def test_update_is_jit_and_vmap_able_across_chains(process):
    problem = make_problem(seed=16, dim=3, data_dim=4, noise="lowrank")
    a, b, y = (jnp.asarray(v) for v in (problem.a, problem.b, problem.y))
    noise = problem.noise
    keys = jax.random.split(jax.random.PRNGKey(10), 3)
    dts = jnp.array([0.3, 0.0, 0.5])
    fails = jnp.array([False, True, False])

    def one_chain(key, dt, fail):
        state = process.init(key, 3)
        g = linear_forward(process.points(state), a, b)
        failed = jnp.zeros(g.shape[0], dtype=bool).at[2].set(fail)
        new = process.update(key, state, g, failed, y, noise, dt)
        return state, new, process.samples(key, new, 5)

    batched = jax.jit(jax.vmap(one_chain))
    out = batched(keys, dts, fails)
    leaves = jax.tree_util.tree_leaves(out)
    # chains are independent: reordering the chains reorders the results
    flipped = jax.tree_util.tree_leaves(batched(keys[::-1], dts[::-1], fails[::-1]))
    for x, r in zip(leaves, flipped, strict=True):
        np.testing.assert_allclose(x, r[::-1], rtol=1e-10, atol=1e-12)
    if process in (CHAIN_PROCESSES["eki-perturbed"], CHAIN_PROCESSES["uki"]):
        # an unbatched reference for each kind of state (EnsembleState, UKIState)
        ref = jax.tree_util.tree_leaves(jax.jit(one_chain)(keys[2], dts[2], fails[2]))
        for x, r in zip(leaves, ref, strict=True):
            np.testing.assert_allclose(x[2], r, rtol=1e-10, atol=1e-12)
    states, new, samples = out
    # the chain with dt = 0 did not move, although one of its members failed
    for x, r in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(states), strict=True):
        np.testing.assert_array_equal(x[1], r[1])
    assert samples.shape[0] == 3 and samples.shape[-1] == 3
    assert np.all(np.isfinite(samples))

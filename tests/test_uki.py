"""UKI: exact tempering on linear-Gaussian problems, the iterative mode's fixed points,
sigma-point constants, Δt = 0, and options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _linear import NOISE_KINDS, jitted, jitted_init, linear_forward, make_problem, run_process

from eki_infer.processes import sigma_points, uki
from eki_infer.processes.uki import sigma_point_constants
from eki_infer.schedulers import DataMisfitController, DefaultScheduler


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


TEMPERING = uki()
ITERATIVE = {}


def iterative(alpha_reg=1.0, update_freq=0):
    key = (alpha_reg, update_freq)
    if key not in ITERATIVE:
        ITERATIVE[key] = uki("iterative", alpha_reg=alpha_reg, update_freq=update_freq)
    return ITERATIVE[key]


def evaluate(process, state, problem):
    points = jitted(process.points)(state)
    return jitted(linear_forward)(points, jnp.asarray(problem.a), jnp.asarray(problem.b))


def run_steps(process, problem, steps):
    y = jnp.asarray(problem.y)
    update = jitted(process.update)
    state = jitted_init(process)(jax.random.PRNGKey(0), problem.dim)
    failed = jnp.zeros(2 * problem.dim + 1, dtype=bool)
    for dt in steps:
        g = evaluate(process, state, problem)
        state = update(jax.random.PRNGKey(1), state, g, failed, y, problem.noise, dt)
    return state


STEP_SEQUENCES = {
    "one": [1.0],
    "two": [0.3, 0.7],
    "ten": list(np.random.default_rng(5).dirichlet(np.ones(10))),
}


@pytest.mark.parametrize("noise", NOISE_KINDS)
@pytest.mark.parametrize("steps", STEP_SEQUENCES.values(), ids=STEP_SEQUENCES.keys())
def test_tempering_is_exact_for_linear_problems(noise, steps):
    problem = make_problem(seed=1, dim=3, data_dim=5, noise=noise)
    mean, cov = problem.posterior()
    state = run_steps(TEMPERING, problem, steps)
    assert rel(state.mean, mean) < 1e-8
    assert rel(state.cov, cov) < 1e-8
    assert int(state.iteration) == len(steps)


def test_tempering_exact_with_fewer_data_than_parameters():
    problem = make_problem(seed=2, dim=6, data_dim=3, noise="dense")
    mean, cov = problem.posterior()
    state = run_steps(TEMPERING, problem, [0.2, 0.5, 0.3])
    assert rel(state.mean, mean) < 1e-8
    assert rel(state.cov, cov) < 1e-8


def test_tempering_with_data_misfit_controller():
    problem = make_problem(seed=3, dim=4, data_dim=6, noise="lowrank", shift=20.0)
    mean, cov = problem.posterior()
    state, info = run_process(TEMPERING, DataMisfitController(), problem, jax.random.PRNGKey(0))
    assert len(info["dts"]) > 1
    assert abs(sum(info["dts"]) - 1.0) < 1e-12
    assert rel(state.mean, mean) < 1e-8
    assert rel(state.cov, cov) < 1e-8
    draws = jax.jit(TEMPERING.samples, static_argnums=2)(jax.random.PRNGKey(1), state, 4000)
    assert draws.shape == (4000, 4)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(np.mean(draws, 0) - mean) < 0.1 * sd)


def test_sigma_points_and_constants():
    for d in (1, 2, 4, 9):
        a, c, w = sigma_point_constants(d)
        assert a == pytest.approx(min(np.sqrt(4 / d), 1))
        assert c == pytest.approx(a * np.sqrt(d))
        assert 2 * d * w * c**2 / d == pytest.approx(1.0)  # weighted second moment = C
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 3))
    cov = f @ f.T + np.eye(3)
    m = rng.normal(size=3)
    pts = np.asarray(sigma_points(jnp.asarray(m), jnp.asarray(cov)))
    _, _, w = sigma_point_constants(3)
    assert pts.shape == (7, 3)
    np.testing.assert_allclose(pts[0], m)
    np.testing.assert_allclose(pts[1:4] + pts[4:] - 2 * m, 0, atol=1e-12)
    np.testing.assert_allclose(w * (pts[1:] - m).T @ (pts[1:] - m), cov, rtol=1e-12)
    # a singular covariance still gives finite points
    sing = np.outer([1.0, 2.0, 0.0], [1.0, 2.0, 0.0])
    assert np.all(np.isfinite(sigma_points(jnp.asarray(m), jnp.asarray(sing))))


def test_iterative_mode_converges_to_least_squares_with_update_freq_one():
    # Σ_ω = (2 − α²) C_n with α = 1 and Σ_ν = 2Γ: the fixed point is the posterior under an
    # uninformative prior, C = (AᵀΓ⁻¹A)⁻¹ and m = the generalised least-squares solution.
    problem = make_problem(seed=4, dim=3, data_dim=8, noise="dense")
    a, gamma = problem.a, problem.gamma
    prec = a.T @ np.linalg.solve(gamma, a)
    cov_ls = np.linalg.inv(prec)
    mean_ls = cov_ls @ a.T @ np.linalg.solve(gamma, problem.y - problem.b)
    state, info = run_process(
        iterative(update_freq=1),
        DefaultScheduler(1.0),
        problem,
        jax.random.PRNGKey(0),
        max_iterations=70,
    )
    assert len(info["dts"]) == 70
    assert rel(state.cov, cov_ls) < 1e-8
    assert rel(state.mean, mean_ls) < 1e-8


def test_iterative_mode_fixed_point_with_regularisation():
    # α < 1, update_freq = 0: C solves C⁻¹ = (α² C + (2 − α²) I)⁻¹ + ½ AᵀΓ⁻¹A.
    alpha = 0.6
    problem = make_problem(seed=5, dim=3, data_dim=4, noise="diagonal")
    state, _ = run_process(
        iterative(alpha_reg=alpha),
        DefaultScheduler(1.0),
        problem,
        jax.random.PRNGKey(0),
        max_iterations=80,
    )
    c = np.asarray(state.cov)
    h = problem.a.T @ np.linalg.solve(problem.gamma, problem.a)
    pred = alpha**2 * c + (2 - alpha**2) * np.eye(3)
    np.testing.assert_allclose(np.linalg.inv(c), np.linalg.inv(pred) + 0.5 * h, rtol=1e-8)
    np.testing.assert_allclose(state.evolution_cov, (2 - alpha**2) * np.eye(3))


def test_update_freq_refreshes_evolution_covariance():
    problem = make_problem(seed=6, dim=2, data_dim=3)
    process = iterative(alpha_reg=0.9, update_freq=2)
    state, _ = run_process(
        process, DefaultScheduler(1.0), problem, jax.random.PRNGKey(0), max_iterations=3
    )
    # refreshed after iteration 2 only: Σ_ω = (2 − α²) C_2 ≠ (2 − α²) I
    assert int(state.iteration) == 3
    assert not np.allclose(state.evolution_cov, (2 - 0.81) * np.eye(2))


def test_zero_step_leaves_state_unchanged():
    problem = make_problem(seed=7, dim=3, data_dim=5, noise="diagonal")
    for process in (TEMPERING, iterative(alpha_reg=0.5, update_freq=1)):
        state = run_steps(process, problem, [0.4])
        g = evaluate(process, state, problem)
        new = jitted(process.update)(
            jax.random.PRNGKey(0),
            state,
            g,
            jnp.zeros(7, bool),
            jnp.asarray(problem.y),
            problem.noise,
            0.0,
        )
        for a, b in zip(new, state, strict=True):
            np.testing.assert_array_equal(a, b)


def test_options_are_validated():
    with pytest.raises(ValueError, match="mode"):
        uki("annealing")
    with pytest.raises(ValueError, match="alpha_reg"):
        uki("iterative", alpha_reg=1.5)
    with pytest.raises(ValueError, match="update_freq"):
        uki("iterative", update_freq=-1)
    with pytest.raises(ValueError, match="iterative"):
        uki("tempering", alpha_reg=0.5)


def test_psd_sqrt_batched_over_chains_repairs_only_the_failed_factor():
    """Under vmap (the driver's chains) the square root asks once whether any Cholesky
    factor failed: a batch with one indefinite covariance gets the eigendecomposition's
    root for it and the Cholesky factors for the others, as matrix-by-matrix calls do."""
    from eki_infer.processes.base import psd_sqrt

    a = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8))
    covs = a @ jnp.swapaxes(a, -1, -2) / 8.0
    covs = covs.at[1, 0, 0].set(-1e-3)  # indefinite: its Cholesky factor is NaN
    batched = np.asarray(jax.jit(jax.vmap(psd_sqrt))(covs))
    one_by_one = np.stack([np.asarray(jax.jit(psd_sqrt)(c)) for c in covs])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12, atol=1e-14)
    assert np.all(np.isfinite(batched))
    for k in (0, 2):  # untouched factors are the Cholesky factors
        np.testing.assert_allclose(batched[k], np.linalg.cholesky(np.asarray(covs[k])), rtol=1e-10)
    w, v = np.linalg.eigh(np.asarray(covs[1]))
    clipped = (v * np.clip(w, 0.0, None)) @ v.T
    np.testing.assert_allclose(batched[1] @ batched[1].T, clipped, atol=1e-12)

"""Failure handling: masking before arithmetic, redraws of failed members, UKI's
renormalised weights, failure counts and the error for fewer than two successes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _linear import jitted, kalman_posterior, linear_forward, make_problem, run_process

from eki_infer.processes import (
    EnsembleFailureError,
    check_failures,
    detect_failures,
    eki,
    eki_perturbed_update,
    eki_transform_update,
    eks_update,
    sigma_points,
    uki,
)
from eki_infer.processes.base import redraw_failed
from eki_infer.processes.uki import sigma_point_constants
from eki_infer.schedulers import DataMisfitController

PROBLEM = make_problem(seed=41, dim=3, data_dim=5, noise="dense")
Y = jnp.asarray(PROBLEM.y)
BAD = np.array([2, 7])


def ensemble(j=10, d=3, seed=0):
    u = jax.random.normal(jax.random.PRNGKey(seed), (j, d))
    g = jitted(linear_forward)(u, jnp.asarray(PROBLEM.a), jnp.asarray(PROBLEM.b))
    return u, g


def with_failures(g, fill=np.nan):
    g = np.array(g)
    g[BAD[0], 1] = fill  # one bad output is enough for the member to fail
    g[BAD[1]] = fill
    return jnp.asarray(g)


def test_transform_successful_members_equal_the_sub_ensemble_update():
    u, g = ensemble()
    ok = np.ones(10, dtype=bool)
    ok[BAD] = False
    update = jitted(eki_transform_update)
    key = jax.random.PRNGKey(1)
    full = np.asarray(
        update(key, u, with_failures(g), Y, PROBLEM.noise, 0.4, jnp.zeros(10, dtype=bool))
    )
    sub = np.asarray(update(key, u[ok], g[ok], Y, PROBLEM.noise, 0.4, jnp.zeros(8, dtype=bool)))
    np.testing.assert_allclose(full[ok], sub, rtol=1e-11, atol=1e-12)
    assert np.all(np.isfinite(full))
    assert not np.allclose(full[BAD], np.asarray(u)[BAD])


@pytest.mark.parametrize("update", [eki_perturbed_update, eki_transform_update, eks_update])
def test_failed_rows_never_poison_the_update(update):
    u, g = ensemble()
    key = jax.random.PRNGKey(2)
    fn = jitted(update)
    none = jnp.zeros(10, dtype=bool)
    with_nan = np.asarray(fn(key, u, with_failures(g, np.nan), Y, PROBLEM.noise, 0.3, none))
    with_inf = np.asarray(fn(key, u, with_failures(g, -np.inf), Y, PROBLEM.noise, 0.3, none))
    # a finite but flagged row is a failure too (the driver's flags are honoured)
    flags = none.at[BAD].set(True)
    flagged = np.asarray(fn(key, u, with_failures(g, 1e300), Y, PROBLEM.noise, 0.3, flags))
    assert np.all(np.isfinite(with_nan))
    np.testing.assert_array_equal(with_nan, with_inf)
    np.testing.assert_array_equal(with_nan, flagged)
    clean = np.asarray(fn(key, u, g, Y, PROBLEM.noise, 0.3, none))
    assert not np.allclose(with_nan[BAD], clean[BAD])  # failed members were redrawn


def test_redraws_follow_the_fitted_gaussian():
    rng = np.random.default_rng(3)
    f = np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -1.0, 0.5]])
    x = rng.normal(size=(2400, 3)) @ f.T + np.array([1.0, -2.0, 3.0])
    ok = np.arange(2400) % 3 != 0
    out = np.asarray(jitted(redraw_failed)(jax.random.PRNGKey(4), jnp.asarray(x), jnp.asarray(ok)))
    np.testing.assert_array_equal(out[ok], x[ok])
    drawn = out[~ok]
    mean, cov = x[ok].mean(0), np.cov(x[ok].T, bias=True)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(drawn.mean(0) - mean) < 0.15 * sd)
    np.testing.assert_allclose(np.cov(drawn.T, bias=True), cov, atol=0.2 * np.min(np.diag(cov)))


def test_redraw_adds_jitter_to_a_singular_fit():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6))
    ok = np.array([True, True, True, False])
    out = np.asarray(jitted(redraw_failed)(jax.random.PRNGKey(6), jnp.asarray(x), jnp.asarray(ok)))
    assert np.all(np.isfinite(out))
    # three members span a 2-dimensional affine set: the jitter leaves it
    basis = np.linalg.svd((x[ok] - x[ok].mean(0)), full_matrices=False)[2][:2]
    resid = (out[3] - x[ok].mean(0)) - basis.T @ (basis @ (out[3] - x[ok].mean(0)))
    assert np.linalg.norm(resid) > 0
    assert np.linalg.norm(resid) < 1e-2 * np.linalg.norm(x[ok] - x[ok].mean(0))


def test_no_failures_leaves_rows_untouched():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(5, 2)))
    out = jitted(redraw_failed)(jax.random.PRNGKey(0), x, jnp.ones(5, dtype=bool))
    np.testing.assert_array_equal(out, x)


def uki_reference(mean, cov, g_fail_index):
    """Kalman posterior of N(m_s, C_s) from the surviving sigma points with rescaled
    off-centre weights (exact for a linear G)."""
    d = len(mean)
    pts = np.asarray(sigma_points(jnp.asarray(mean), jnp.asarray(cov)))
    _, _, w = sigma_point_constants(d)
    ok = np.ones(2 * d + 1, dtype=bool)
    ok[g_fail_index] = False
    off = ok[1:]
    w_s = w * 2 * d / off.sum()
    m_s = pts[0] if ok[0] else pts[1:][off].mean(0)
    dev = pts[1:][off] - m_s
    c_s = w_s * dev.T @ dev
    return kalman_posterior(PROBLEM.a, PROBLEM.b, PROBLEM.y, PROBLEM.gamma, m_s, c_s)


@pytest.mark.parametrize("fail_index", [[2], [0], [0, 4]], ids=["off-centre", "centre", "both"])
def test_uki_renormalises_weights_over_successful_points(fail_index):
    process = TEMPERING
    rng = np.random.default_rng(8)
    f = rng.normal(size=(3, 3)) * 0.5
    state = process.init(None, 3)._replace(
        mean=jnp.asarray(rng.normal(size=3)), cov=jnp.asarray(f @ f.T + 0.5 * np.eye(3))
    )
    pts = jitted(process.points)(state)
    g = np.array(jitted(linear_forward)(pts, jnp.asarray(PROBLEM.a), jnp.asarray(PROBLEM.b)))
    g[fail_index] = np.nan
    failed = jnp.asarray(detect_failures(jnp.asarray(g)))
    new = jitted(process.update)(None, state, jnp.asarray(g), failed, Y, PROBLEM.noise, 1.0)
    mean, cov = uki_reference(np.asarray(state.mean), np.asarray(state.cov), fail_index)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(new.cov, cov, rtol=1e-9, atol=1e-12)


TEMPERING = uki()


def test_check_failures_counts_and_errors():
    assert check_failures(np.array([False, True, False, True]), 3) == 2
    np.testing.assert_array_equal(
        check_failures(np.array([[False, False, True], [False, False, False]]), 0), [1, 0]
    )
    with pytest.raises(EnsembleFailureError, match=r"Iteration 7: only 1 of 4 .*3 failed"):
        check_failures(np.array([True, True, False, True]), 7)
    with pytest.raises(EnsembleFailureError, match=r"Iteration 2.*chain\(s\) 1"):
        check_failures(np.array([[False, False, True], [True, True, True]]), 2)


def failing_forward(u, a, b):
    """The linear map, failing (NaN) where the first coordinate exceeds 1.2."""
    g = u @ a.T + b
    return jnp.where(u[..., :1] > 1.2, jnp.nan, g)


def all_but_one_fail(u, a, b):
    g = u @ a.T + b
    return g.at[1:].set(jnp.nan)


def test_run_with_failing_members_recovers():
    problem = make_problem(seed=42, dim=3, data_dim=5, noise="diagonal", shift=2.0)
    state, info = run_process(
        eki(60), DataMisfitController(), problem, jax.random.PRNGKey(9), forward=failing_forward
    )
    assert info["failures"][0] > 0  # some prior draws land in the failing region
    assert np.all(np.isfinite(state.particles))
    assert abs(sum(info["dts"]) - 1.0) < 1e-12


def test_run_with_fewer_than_two_successes_raises():
    with pytest.raises(EnsembleFailureError, match="Iteration 0: only 1 of 8"):
        run_process(
            eki(8), DataMisfitController(), PROBLEM, jax.random.PRNGKey(0), forward=all_but_one_fail
        )


def test_a_diverging_ensemble_raises_naming_the_scheduler():
    """EKS under the data-misfit controller on a small linear problem: the controller's
    steps are too large for EKS's explicit drift and the mean misfit grows 4-14× per
    iteration (47 → 173 → 2270 → 3.2e4 → 4.6e5 on this key). Before, the run went on
    for 179 iterations until the ensemble overflowed and the error blamed the forward
    map, or (with PRNGKey(1)) returned the diverged ensemble."""
    import warnings

    import numpyro
    import numpyro.distributions as dist

    from eki_infer import EKIInference, EnsembleDivergenceError

    design = np.random.default_rng(0).normal(size=(6, 2))

    def model(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("y", dist.Normal(design @ theta, 0.3).to_event(1), obs=y)

    y = design @ np.array([0.5, -1.0]) + 0.3 * np.random.default_rng(1).normal(size=6)
    engine = EKIInference(
        model, "eks", ensemble_size=50, scheduler=DataMisfitController(), progress_bar=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # EKS with a DataMisfitController
        with pytest.raises(EnsembleDivergenceError) as err:
            engine.run(jax.random.PRNGKey(0), y=y)
    message = str(err.value)
    for fragment in (
        "Iteration 4",
        "diverged in chain(s) 0",
        "DataMisfitController",
        "EKSStableScheduler",
    ):
        assert fragment in message, message
    assert isinstance(err.value, EnsembleFailureError)
    misfit = engine.history.misfit_mean[0]  # kept for diagnosis
    assert misfit[-1] > 1000 * misfit[0]
    # the default scheduler keeps the same problem stable, and it does not raise
    stable = EKIInference(model, "eks", ensemble_size=50, progress_bar=False)
    stable.run(jax.random.PRNGKey(0), y=y)
    assert np.max(stable.history.misfit_mean) < 10 * stable.history.misfit_mean[0, 0]


def test_divergence_is_measured_against_the_prior_ensemble_and_the_data_size():
    from eki_infer.processes import EnsembleDivergenceError, check_divergence

    rows = [np.array([2.0, 2.0, 50.0]), np.array([1.0, 1.5e4, 4.0e4])]
    # chain 1: 1.5e4 > 1000 × max(2, M = 10); chain 2: 4e4 < 1000 × 50; chain 0 fine
    with pytest.raises(EnsembleDivergenceError, match=r"chain\(s\) 7: .* 1\.5e\+04 \(chain 7\)"):
        check_divergence(rows, 10, 3, active=np.ones(3, bool), chain_ids=[6, 7, 8])
    check_divergence(rows, 10, 3, active=np.array([True, False, True]))  # chain 1 is done
    check_divergence(rows, 20, 3, active=np.ones(3, bool))  # M = 20: the limit is 2e4
    check_divergence(rows[:1], 10, 0, active=np.ones(3, bool))  # nothing to compare yet

"""EKIInference end to end: ArviZ groups on the installed ArviZ line, determinism across
chain counts, accuracy on a linear-Gaussian model with a closed-form posterior, NumPyro-
style accessors and clear errors."""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from eki_infer import EKIInference
from eki_infer.convert import ARVIZ_1, group


def linear_model(X, y=None):
    """θ ~ N(0, diag(1, 4)), y = X θ + N(0, 0.5² I), M = 6 observations in a plate."""
    theta = numpyro.sample("theta", dist.Normal(0.0, jnp.array([1.0, 2.0])).to_event(1))
    numpyro.deterministic("theta_sum", theta.sum())
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ theta, 0.5), obs=y)


def exact_linear_posterior(X, y):
    prior_precision = np.diag([1.0, 0.25])
    precision = prior_precision + X.T @ X / 0.25
    cov = np.linalg.inv(precision)
    return cov @ (X.T @ y / 0.25), cov


@pytest.fixture(scope="module")
def linear_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 2))
    y = X @ np.array([0.7, -1.5]) + 0.5 * rng.normal(size=6)
    return jnp.asarray(X), jnp.asarray(y)


@pytest.fixture(scope="module")
def eki_run(linear_data):
    X, y = linear_data
    engine = EKIInference(linear_model, "eki", ensemble_size=400, num_chains=2, progress_bar=False)
    data = engine.run(jax.random.PRNGKey(0), X, y=y)
    return engine, data


def test_groups_contents_and_shapes(eki_run, linear_data):
    engine, data = eki_run
    posterior = group(data, "posterior")
    assert posterior["theta"].shape == (2, 400, 2)
    assert posterior["theta_sum"].shape == (2, 400)
    np.testing.assert_allclose(
        posterior["theta_sum"].values, posterior["theta"].values.sum(-1), rtol=1e-12
    )
    assert group(data, "prior")["theta"].shape == (2, 400, 2)
    assert group(data, "posterior_predictive")["y"].shape == (2, 400, 6)
    assert group(data, "log_likelihood")["y"].shape == (2, 400, 6)
    assert group(data, "observed_data")["y"].shape == (6,)
    stats = group(data, "sample_stats")
    assert stats["data_misfit"].shape == (2, 400)
    assert not stats["failed"].values.any()
    assert "obs" in posterior_predictive_dims(data)
    history = group(data, "ensemble_history")
    assert set(history.data_vars) >= {"t", "dt", "misfit_mean", "num_failed"}
    # the data-misfit controller ends exactly at T = 1
    np.testing.assert_allclose(engine.history.t[:, -1], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(engine.history.dt.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (np.diff(engine.history.forward_evaluations, axis=1) == 400).all()


def posterior_predictive_dims(data):
    return group(data, "posterior_predictive")["y"].dims


def test_eki_matches_closed_form(eki_run, linear_data):
    engine, _ = eki_run
    X, y = linear_data
    mean, cov = exact_linear_posterior(np.asarray(X), np.asarray(y))
    theta = engine.get_samples()["theta"]
    sd = np.sqrt(np.diag(cov))
    # 800 members: Monte-Carlo error of the mean ≈ 0.035 sd, of the sd ≈ 2.5 %
    assert np.all(np.abs(theta.mean(0) - mean) < 0.15 * sd)
    assert np.all(np.abs(theta.std(0) / sd - 1) < 0.1)


def test_uki_is_exact_on_linear_gaussian(linear_data):
    X, y = linear_data
    engine = EKIInference(linear_model, "uki", num_samples=4000, progress_bar=False)
    engine.run(jax.random.PRNGKey(3), X, y=y)
    mean, cov = exact_linear_posterior(np.asarray(X), np.asarray(y))
    state = engine.final_state
    prior_sd = np.array([1.0, 2.0])  # θ = prior_sd · u: the prior transform is affine here
    u_mean, u_cov = np.asarray(state.mean)[0], np.asarray(state.cov)[0]
    np.testing.assert_allclose(prior_sd * u_mean, mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.outer(prior_sd, prior_sd) * u_cov, cov, rtol=1e-8, atol=1e-12)
    theta = engine.get_samples()["theta"]
    assert theta.shape == (4000, 2)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(theta.mean(0) - mean) < 0.1 * sd)
    # the run's cost is the sigma points' evaluations; the draws' own evaluations (for the
    # predictive) are counted apart
    idata = engine.inference_data
    attrs = getattr(idata, "attrs", None) or idata.posterior.attrs
    assert attrs["forward_evaluations"] == engine.history.forward_evaluations[0, -1]
    assert attrs["forward_evaluations"] % 5 == 0  # 2d + 1 points per update
    assert attrs["predictive_evaluations"] == 4000


def _theta_by_chain(X, y, chains, chain_method):
    engine = EKIInference(
        linear_model,
        "eki",
        ensemble_size=50,
        num_chains=chains,
        chain_method=chain_method,
        progress_bar=False,
    )
    engine.run(jax.random.PRNGKey(11), X, y=y)
    return engine.get_samples(group_by_chain=True)["theta"]


def test_same_key_same_result_and_chain_zero_independent_of_chain_count(linear_data):
    X, y = linear_data
    one, three, three_again = (_theta_by_chain(X, y, c, "vectorized") for c in (1, 3, 3))
    np.testing.assert_array_equal(three, three_again)
    assert not np.array_equal(three[0], three[1])
    # vectorized: another batch size may change XLA's kernels, so rounding may differ
    np.testing.assert_allclose(one[0], three[0], rtol=1e-12, atol=1e-12)
    # sequential: each chain computed alone, bit for bit the same
    seq_one, seq_three = (_theta_by_chain(X, y, c, "sequential") for c in (1, 3))
    np.testing.assert_array_equal(seq_one[0], seq_three[0])
    np.testing.assert_array_equal(seq_one[0], one[0])
    np.testing.assert_allclose(seq_three, three, rtol=1e-12, atol=1e-12)


def test_get_samples_and_print_summary(eki_run, capsys):
    engine, _ = eki_run
    assert engine.get_samples()["theta"].shape == (800, 2)
    assert engine.get_samples(group_by_chain=True)["theta"].shape == (2, 400, 2)
    engine.print_summary()
    out = capsys.readouterr().out
    assert "theta[0]" in out and "r_hat" in out


def test_arviz_functions_accept_the_result(eki_run, tmp_path):
    _, data = eki_run
    summary = az.summary(data, var_names=["theta"])
    assert len(summary) == 2
    loo = az.loo(data)
    assert np.isfinite(float(loo["elpd_loo"] if not ARVIZ_1 else loo.elpd))
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            az.plot_dist(data, var_names=["theta"])
        else:
            az.plot_posterior(data, var_names=["theta"])


def test_eks_and_transform_eki_run(linear_data):
    X, y = linear_data
    for method, options in (("eks", {"max_iterations": 30}), ("eki", {"eki_variant": "transform"})):
        engine = EKIInference(linear_model, method, ensemble_size=30, progress_bar=False, **options)
        engine.run(jax.random.PRNGKey(5), X, y=y)
        theta = engine.get_samples()["theta"]
        assert theta.shape == (30, 2) and np.isfinite(theta).all()


def test_progress_bar_shows_iterations(linear_data, capsys):
    X, y = linear_data
    engine = EKIInference(linear_model, "eki", ensemble_size=20, progress_bar=True)
    engine.run(jax.random.PRNGKey(2), X, y=y)
    err = capsys.readouterr().err
    assert "EKI" in err and "misfit" in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "nuts"}, "method"),
        ({"ensemble_size": 1}, "ensemble_size"),
        ({"num_chains": 0}, "num_chains"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"blas_threads": 0}, "blas_threads"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EKIInference(linear_model, **kwargs)


def test_small_ensemble_warns(linear_data):
    X, y = linear_data
    engine = EKIInference(linear_model, "eki", ensemble_size=2, progress_bar=False)
    with pytest.warns(UserWarning, match="ensemble_size=2"):
        engine.run(jax.random.PRNGKey(0), X, y=y)


def test_iterative_uki_with_data_misfit_controller_warns(linear_data):
    from eki_infer.schedulers import DataMisfitController

    X, y = linear_data
    engine = EKIInference(
        linear_model,
        "uki",
        uki_mode="iterative",
        scheduler=DataMisfitController(),
        max_iterations=3,
        progress_bar=False,
    )
    with pytest.warns(UserWarning, match="iterative UKI"):
        engine.run(jax.random.PRNGKey(0), X, y=y)


def test_blas_threads_are_limited_during_a_run_and_restored_after():
    """The default blas_threads=1 holds while the forward map runs (seen from inside a
    black-box simulator) and the previous BLAS thread counts come back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from eki_infer.simulators import black_box

    def blas_counts():
        return sorted(
            (info["filepath"], info["num_threads"])
            for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"
        )

    seen = []

    @black_box(output_shape=(3,))
    def simulator(theta):
        seen.append(max(n for _, n in blas_counts()))
        return np.array([theta[0], theta[0] ** 2, 1.0 + theta[0]])

    def model(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        numpyro.sample("y", dist.Normal(simulator(theta), 0.5).to_event(1), obs=y)

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_counts()
        engine = EKIInference(model, "eki", ensemble_size=20, max_iterations=3, progress_bar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.run(jax.random.PRNGKey(0), y=jnp.array([0.5, 0.3, 1.4]))
        assert blas_counts() == before
    assert seen and max(seen) == 1

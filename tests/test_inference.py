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


def test_a_short_eks_run_warns_that_it_has_not_relaxed(linear_data):
    """30 EKS iterations reach T ≈ 0.5 here: the ensemble is still mostly its prior draw.
    The default 200 reach T > 2 (5.7 on the linear reference model), and do not warn."""
    X, y = linear_data
    short = EKIInference(
        linear_model, "eks", ensemble_size=30, progress_bar=False, max_iterations=30
    )
    with pytest.warns(UserWarning, match=r"EKS reached time T = \[0\.\d+\] \(chains \[0\]\)"):
        short.run(jax.random.PRNGKey(5), X, y=y)
    full = EKIInference(linear_model, "eks", ensemble_size=30, progress_bar=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="EKS reached time")
        full.run(jax.random.PRNGKey(5), X, y=y)


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
        # counts are integers: not rounded, not parsed
        ({"ensemble_size": 20.9}, r"ensemble_size must be an integer >= 2 .* got 20.9"),
        ({"num_chains": 2.7}, r"num_chains must be a positive integer, got 2.7"),
        ({"max_iterations": "20"}, r"max_iterations must be a positive integer, got '20'"),
        ({"num_samples": True}, r"num_samples must be a positive integer, got True"),
        # step numbers index random keys; the numbers from 2**30 on are the final draws
        ({"max_iterations": 2**30}, r"max_iterations must be at most 1073741823"),
        # method-specific options: checked when the engine is built, refused elsewhere
        ({"eki_variant": "perturbd"}, r"eki_variant must be one of \('perturbed', 'transform'\)"),
        ({"method": "uki", "uki_mode": "tempered"}, r"uki_mode must be one of"),
        ({"method": "uki", "eki_variant": "transform"}, r"eki_variant applies to method='eki'"),
        ({"aldi": False}, r"aldi applies to method='eks' only; this engine's method is 'eki'"),
        ({"uki_mode": "iterative"}, r"uki_mode applies to method='uki' only"),
        ({"smc_options": {"ess_target": 0.5}}, r"smc_options applies to method='smc' only"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EKIInference(linear_model, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": None}, "model must be a NumPyro model"),
        ({"method": "eks", "aldi": "no"}, r"aldi must be True or False, got 'no'"),
        ({"progress_bar": 1}, r"progress_bar must be True or False"),
    ],
)
def test_options_of_the_wrong_type_are_named(kwargs, match):
    kwargs = {"model": linear_model, **kwargs}
    with pytest.raises(TypeError, match=match):
        EKIInference(**kwargs)


@pytest.mark.parametrize("key", [0, np.zeros(2), jax.random.split(jax.random.PRNGKey(0), 3)])
def test_a_bad_rng_key_is_refused_before_tracing(linear_data, key):
    X, y = linear_data
    engine = EKIInference(linear_model, "eki", ensemble_size=20, progress_bar=False)
    with pytest.raises(TypeError, match="rng_key must be one JAX PRNG key"):
        engine.run(key, X, y=y)
    assert engine.problem is None  # refused before the model was traced


def test_a_failed_run_leaves_no_earlier_result_behind(linear_data):
    """After a run that raises, the engine holds no samples or ArviZ object of an
    earlier run next to the failed run's problem and history."""
    X, y = linear_data
    engine = EKIInference(linear_model, "eki", ensemble_size=20, progress_bar=False)
    engine.run(jax.random.PRNGKey(0), X, y=y)
    with pytest.raises(ValueError):
        engine.run(jax.random.PRNGKey(0), X, y=np.full(6, np.nan))
    assert engine.inference_data is None
    with pytest.raises(RuntimeError, match="No samples yet"):
        engine.get_samples()


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


def test_log_likelihood_is_per_event_as_numpyro_gives_it():
    """A ``.to_event`` likelihood is one observation per draw, as in
    numpyro.infer.util.log_likelihood (and so in az.from_numpyro): LOO and az.compare
    line up with a NUTS run of the same model."""
    from numpyro.infer.util import log_likelihood

    from models import linear_gaussian

    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(1))
    engine = EKIInference(linear_gaussian.model, "eki", ensemble_size=50, progress_bar=False)
    data = engine.run(jax.random.PRNGKey(0), *args, y=y)
    ours = group(data, "log_likelihood")["y"].values
    assert ours.shape == (1, 50)
    latents = {s.name: engine.get_samples()[s.name] for s in engine.problem.latent_sites}
    reference = log_likelihood(linear_gaussian.model, latents, *args, y=y)["y"]
    np.testing.assert_allclose(ours[0], reference, rtol=1e-8)


_GLOBAL_SLOPE = np.array([2.0])


def _model_reading_a_global():
    """Data made from a module global that the model reads (not an argument)."""
    x = jnp.linspace(0.0, 1.0, 5)
    a = numpyro.sample("a", dist.Normal(0.0, 3.0))
    numpyro.sample("obs", dist.Normal(a * x, 0.1), obs=_GLOBAL_SLOPE[0] * x)


@pytest.mark.parametrize("method", ["eki", "smc"])
def test_a_changed_global_is_not_served_from_compiled_code(method):
    """Values a model reads from globals are constants of the compiled code: a new run,
    on a new engine or the same one, must see the new values (the caches key on them)."""
    global _GLOBAL_SLOPE
    size = 40 if method == "eki" else 100
    _GLOBAL_SLOPE = np.array([2.0])
    engine = EKIInference(_model_reading_a_global, method, ensemble_size=size, progress_bar=False)
    engine.run(jax.random.PRNGKey(0))
    assert abs(engine.get_samples()["a"].mean() - 2.0) < 0.2
    try:
        _GLOBAL_SLOPE = np.array([-3.0])
        fresh = EKIInference(
            _model_reading_a_global, method, ensemble_size=size, progress_bar=False
        )
        fresh.run(jax.random.PRNGKey(0))
        assert abs(fresh.get_samples()["a"].mean() + 3.0) < 0.2
        _GLOBAL_SLOPE = np.array([1.0])
        engine.run(jax.random.PRNGKey(0))
        assert abs(engine.get_samples()["a"].mean() - 1.0) < 0.2
    finally:
        _GLOBAL_SLOPE = np.array([2.0])


def test_model_fingerprint_follows_globals_closures_and_partials():
    import functools

    from eki_infer.model_args import model_fingerprint

    scale = np.ones(3)

    def helper():
        return _GLOBAL_SLOPE * scale

    def model(offset):
        return helper() + offset

    before = model_fingerprint(functools.partial(model, 1.0))
    scale[0] = 2.0  # a closure cell's array, changed in place
    assert model_fingerprint(functools.partial(model, 1.0)) != before
    assert model_fingerprint(functools.partial(model, 5.0)) != model_fingerprint(
        functools.partial(model, 1.0)
    )
    assert model_fingerprint(model) == model_fingerprint(model)


def test_failing_members_are_warned_about():
    """Most members failing at an iteration, and failed final draws (which keep NaN
    log-likelihoods, so LOO is NaN), are warned about, not only recorded."""
    x = jnp.linspace(0.0, 1.0, 5)

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(jnp.where(a > 0.5, jnp.nan, a * x), 0.1), obs=y)

    engine = EKIInference(model, "eki", ensemble_size=40, progress_bar=False)
    with pytest.warns(UserWarning) as record:
        data = engine.run(jax.random.PRNGKey(0), y=2.0 * x)
    messages = " ".join(str(w.message) for w in record)
    assert "left their range for that member) for more than half of the 40 members" in messages
    failed = group(data, "sample_stats")["failed"].values
    assert failed.any() and f"for [{int(failed.sum())}] of the 40 final draws" in messages
    assert np.isnan(group(data, "log_likelihood")["obs"].values[failed]).all()


def test_uki_failures_are_counted_in_sigma_points():
    from eki_infer.processes import EnsembleFailureError

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(jnp.full(3, jnp.nan) * a, 0.1), obs=y)

    engine = EKIInference(model, "uki", progress_bar=False)
    with pytest.raises(EnsembleFailureError, match="only 0 of 3 sigma points returned finite"):
        engine.run(jax.random.PRNGKey(0), y=jnp.ones(3))


def test_smc_with_fewer_particles_than_dimensions_warns():
    def model(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([30]).to_event(1))
        numpyro.sample("y", dist.Normal(theta[:5], 0.5), obs=y)

    engine = EKIInference(model, "smc", ensemble_size=20, max_iterations=1, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the max-stages warning
        with pytest.warns(UserWarning, match="ensemble_size=20 particles for d=30"):
            engine.run(jax.random.PRNGKey(0), y=jnp.zeros(5))


def _decay_model(prior_sd, noise):
    def model(t, y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, prior_sd))
        numpyro.sample("y", dist.Normal(jnp.exp(-rate * t), noise).to_event(1), obs=y)

    return model


def test_a_checkpoint_of_another_model_or_a_damaged_one_is_refused(tmp_path):
    """Same structure, other priors and noise: refused (the probe digest differs), not
    resumed into the old posterior, and the message names what differs. A missing file
    is an error for resume(), not a fresh run. A truncated or altered file is refused by
    name."""
    from eki_infer.checkpoint import CheckpointMismatchError

    t = jnp.linspace(0.0, 2.0, 8)
    y = jnp.exp(-1.3 * t)
    path = tmp_path / "run.ckpt"
    options = {"ensemble_size": 20, "max_iterations": 4, "progress_bar": False}
    EKIInference(_decay_model(0.5, 0.05), "eki", **options).run(
        jax.random.PRNGKey(3), t, y=y, checkpoint=path
    )
    other = EKIInference(_decay_model(2.0, 0.5), "eki", **options)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"different run \(it differs in its model's priors, noise or forward map\)",
    ):
        other.resume(jax.random.PRNGKey(3), t, y=y, checkpoint=path)
    same = EKIInference(_decay_model(0.5, 0.05), "eki", **options)
    with pytest.raises(CheckpointMismatchError, match=r"\(it differs in its rng_key\)"):
        same.resume(jax.random.PRNGKey(4), t, y=y, checkpoint=path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*typo\.ckpt"):
        other.resume(jax.random.PRNGKey(3), t, y=y, checkpoint=tmp_path / "typo.ckpt")
    assert not (tmp_path / "typo.ckpt").exists()
    same.resume(jax.random.PRNGKey(3), t, y=y, checkpoint=path)  # the same run resumes

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="not a readable eki_infer checkpoint"):
        same.resume(jax.random.PRNGKey(3), t, y=y, checkpoint=path)
    altered = bytearray(data)
    altered[-200] ^= 0x01
    path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointMismatchError, match="not a readable eki_infer checkpoint"):
        same.resume(jax.random.PRNGKey(3), t, y=y, checkpoint=path)


def test_uki_failed_sigma_points_are_warned_about():
    x = jnp.linspace(0.0, 1.0, 5)

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(jnp.where(a > 0.5, jnp.nan, a + b * x), 0.1), obs=y)

    engine = EKIInference(model, "uki", num_samples=50, progress_bar=False)
    with pytest.warns(UserWarning, match="UKI drops them and renormalises"):
        engine.run(jax.random.PRNGKey(0), y=0.3 + 0.5 * x)


@pytest.mark.parametrize(
    ("method", "likelihood"),
    [
        ("eki", "normal"),
        ("eks", "normal"),
        ("uki", "normal"),
        ("smc", "normal"),
        # a multivariate site's log_likelihood group comes from the outputs too: before,
        # it ran the simulator once more per draw, uncounted
        ("eki", "mvn"),
        ("smc", "mvn"),
    ],
)
def test_every_simulator_call_is_accounted_for(method, likelihood):
    """forward_runs (every run the method made) + tracing_evaluations (the tracer's
    probe) = the simulator calls actually made; forward_evaluations (the updates') and
    predictive_evaluations (the final draws') are parts of forward_runs."""
    from eki_infer.simulators import black_box

    calls = []
    t = np.linspace(0.0, 2.0, 6)

    def decay(rate):
        calls.append(1)
        return np.exp(-float(rate) * t)

    simulator = black_box(decay, output_shape=(6,))

    def model(y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
        if likelihood == "normal":
            numpyro.sample("y", dist.Normal(simulator(rate), 0.05).to_event(1), obs=y)
        else:
            cov = 0.05**2 * (np.eye(6) + 0.3 * np.eye(6, k=1) + 0.3 * np.eye(6, k=-1))
            numpyro.sample("y", dist.MultivariateNormal(simulator(rate), cov), obs=y)

    options = {"progress_bar": False, "max_iterations": 4}
    if method == "uki":
        options["num_samples"] = 30
    elif method == "smc":
        options["ensemble_size"] = 40
    else:
        options["ensemble_size"] = 20
    engine = EKIInference(model, method, num_chains=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iterations reached before T = 1
        data = engine.run(jax.random.PRNGKey(0), y=np.exp(-1.3 * t))
    attrs = data.attrs
    assert attrs["forward_evaluations"] == engine.history.forward_evaluations[:, -1].sum()
    assert attrs["forward_runs"] + attrs["tracing_evaluations"] == len(calls)
    used = attrs["forward_evaluations"] + attrs["predictive_evaluations"]
    assert used <= attrs["forward_runs"]
    # UKI's last sigma points are evaluated but drive no update; SMC's batches carry
    # chains that are already done
    if method in ("eki", "eks"):
        assert used == attrs["forward_runs"]


def test_model_fingerprint_looks_through_handlers_and_callable_objects():
    from numpyro import handlers

    from eki_infer.model_args import model_fingerprint

    global _GLOBAL_SLOPE
    wrapped = handlers.substitute(_model_reading_a_global, {"unused": 1.0})
    try:
        before = model_fingerprint(wrapped)
        _GLOBAL_SLOPE = np.array([-1.0])
        assert model_fingerprint(wrapped) != before
    finally:
        _GLOBAL_SLOPE = np.array([2.0])

    class Model:
        def __init__(self, slope):
            self.slope = slope

        def __call__(self, y=None):
            return self.slope

    assert model_fingerprint(Model(np.ones(2))) != model_fingerprint(Model(np.zeros(2)))


_X5 = jnp.linspace(0.0, 1.0, 5)


def _bounded_by_a_latent(y=None):
    """th ~ Uniform(lo, 1) with lo ~ N(0, 1): undefined where lo ≥ 1 (14 % of the prior)."""
    lo = numpyro.sample("lo", dist.Normal(0.0, 1.0))
    th = numpyro.sample("th", dist.Uniform(lo, 1.0))
    numpyro.sample("y", dist.Normal(th * _X5, 0.1), obs=y)


def test_a_prior_whose_parameters_leave_their_range_fails_the_member():
    """Where lo ≥ 1 NumPyro's density is NaN (NUTS never goes there); the transform gave
    th in (1, lo) instead and EKI put its whole posterior there. Such members now fail:
    NaN values and outputs, redrawn by EKI, rejected by SMC, which then matches
    quadrature of the density on its domain, N(lo) 1[lo < th < 1] / (1 − lo) L(th)."""
    from scipy.stats import norm

    from eki_infer.tracing import trace_model

    y = 0.8 * _X5 + 0.1 * np.array([0.5, -0.3, 0.2, 0.0, -0.4])
    problem = trace_model(_bounded_by_a_latent, y=y)
    u = jnp.array([[0.0, 0.0], [1.5, 0.0]])  # lo = 0 (valid), lo = 1.5 (invalid)
    values, outputs = problem.transform_and_forward(u)
    assert np.isfinite(values["th"][0]) and np.all(np.isfinite(outputs[0]))
    assert np.isnan(values["th"][1]) and np.all(np.isnan(outputs[1]))

    eki = EKIInference(_bounded_by_a_latent, "eki", ensemble_size=100, progress_bar=False)
    with pytest.warns(UserWarning, match="forward map failed"):
        post = eki.run(jax.random.PRNGKey(0), y=y).posterior
    lo, th = np.asarray(post["lo"]).ravel(), np.asarray(post["th"]).ravel()
    ok = np.isfinite(th)
    assert ok.mean() > 0.9 and np.all(lo[ok] < th[ok]) and np.all(th[ok] <= 1.0)

    smc = EKIInference(_bounded_by_a_latent, "smc", progress_bar=False)
    post = smc.run(jax.random.PRNGKey(1), y=y).posterior
    lo, th = np.asarray(post["lo"]).ravel(), np.asarray(post["th"]).ravel()
    assert np.all(lo < th) and np.all(th <= 1.0)

    a = np.linspace(-6.0, 1.0, 1401)[:-1]
    t = np.linspace(-6.0, 1.0, 1401)
    A, T = np.meshgrid(a, t, indexing="ij")
    misfit = ((T[..., None] * np.asarray(_X5) - y) ** 2).sum(-1) / (2 * 0.1**2)
    w = norm.pdf(A) * (A < T) / (1.0 - A) * np.exp(-(misfit - misfit.min()))
    w /= w.sum()
    for x, grid in ((lo, A), (th, T)):
        mean = (w * grid).sum()
        sd = np.sqrt((w * (grid - mean) ** 2).sum())
        assert abs(x.mean() - mean) < 0.1 * sd and abs(x.std() / sd - 1) < 0.1

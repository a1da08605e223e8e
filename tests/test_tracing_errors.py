"""Models trace_model cannot serve: each raises ModelTracingError naming the site."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from eki_infer.tracing import ModelTracingError, trace_model

Y = np.array([1.0, 2.0, 3.0])


def _raises(model, *args, match=(), site=None, **kwargs):
    with pytest.raises(ModelTracingError) as err:
        trace_model(model, *args, **kwargs)
    message = str(err.value)
    for fragment in match:
        assert fragment in message, message
    if site is not None:
        assert f"'{site}'" in message and err.value.site == site, message
    return message


def test_non_gaussian_likelihood():
    def model(y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
        numpyro.sample("counts", dist.Poisson(rate), obs=y)

    _raises(
        model,
        y=np.array([1, 2]),
        site="counts",
        match=(
            "Poisson",
            "Normal, MultivariateNormal, LowRankMultivariateNormal",
            "optimisation mode, eki_infer.ml.EKIOptimizer",
        ),
    )


def test_transformed_gaussian_likelihood_is_not_gaussian():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.LogNormal(m, 0.1), obs=y)

    _raises(model, y=Y, site="y", match=("LogNormal",))


def test_factor_is_rejected():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.factor("penalty", -(m**2))
        numpyro.sample("y", dist.Normal(m, 1.0), obs=y)

    _raises(model, y=Y, site="penalty", match=("numpyro.factor",))


def test_noise_depending_on_a_latent():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    message = _raises(model, y=Y, site="y", match=("depends on", "'sigma'", "substitute"))
    assert "'mu'" not in message
    # the fix suggested in the message works
    problem = trace_model(handlers.substitute(model, {"sigma": 0.5}), y=Y)
    np.testing.assert_allclose(problem.noise.variances(), 0.25)


def test_noise_depending_on_a_latent_only_away_from_the_probe_points():
    """A scale that is constant wherever the model is probed still depends on 'a': the
    structural check names it (and not 'b', which the scale does not read)."""

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a + b, jnp.where(a > 2.5, 0.05, 0.3)), obs=y)

    message = _raises(model, y=Y, site="y", match=("computed from latent variables ('a')",))
    assert "'b'" not in message

    def shape_only(y=None):  # the scale takes the mean's shape, not its value
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a, 0.3 * jnp.ones_like(a + jnp.zeros(3))), obs=y)

    np.testing.assert_allclose(trace_model(shape_only, y=Y).noise.variances(), 0.09)

    @jax.jit
    def simulate(a, sigma):  # one jitted helper returns the mean and the (fixed) scale
        return a + jnp.arange(3.0), sigma

    def jitted_helper(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        mean, scale = simulate(a, 0.3)
        numpyro.sample("y", dist.Normal(mean, scale), obs=y)

    np.testing.assert_allclose(trace_model(jitted_helper, y=Y).noise.variances(), 0.09)


def test_the_noise_message_names_no_made_up_site():
    """No single latent moves the scale at the probe points: the message names the ones
    the scale is computed from instead of a placeholder."""

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a + b, jnp.where(jnp.abs(a) > 0.5, 1.0, 0.3)), obs=y)

    message = _raises(model, y=Y, site="y")
    assert "the noise parameter" not in message and "'a'" in message, message


def test_data_that_would_be_repeated_are_refused():
    """A column vector against a vector mean would compare every datum with every output."""

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a + jnp.arange(3.0), 0.3), obs=y)

    _raises(model, y=Y[:, None], site="y", match=("(3, 1)", "(3,)", "(3, 3)"))
    _raises(model, y=np.float64(1.0), site="y", match=("broadcast to (3,)",))
    # replicated observations (more leading dims) and a scalar mean on a vector are fine
    assert trace_model(model, y=np.stack([Y, Y])).data_dim == 6

    def scalar_mean(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a, 0.3), obs=y)

    assert trace_model(scalar_mean, y=Y).data_dim == 3


def test_mvn_covariance_depending_on_a_latent():
    def model(y=None):
        ell = numpyro.sample("ell", dist.LogNormal(0.0, 0.3))
        x = jnp.arange(3.0)
        cov = jnp.exp(-((x[:, None] - x[None, :]) ** 2) / ell) + 0.1 * jnp.eye(3)
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(3), cov), obs=y)

    _raises(
        model, y=Y, site="y", match=("'ell'", "numpyro.handlers.substitute(model, {'ell': value})")
    )


def test_discrete_latent():
    def model(y=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    _raises(model, y=Y, site="z", match=("discrete", "Bernoulli"))

    def in_a_plate(y=None):
        with numpyro.plate("units", 3):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    # the family itself is named, not only the wrapper the plate puts around it
    _raises(
        in_a_plate, y=Y, site="z", match=("is discrete (BernoulliProbs in ExpandedDistribution)",)
    )


def test_improper_prior():
    def model(y=None):
        m = numpyro.sample("m", dist.ImproperUniform(dist.constraints.real, (), ()))
        numpyro.sample("y", dist.Normal(m, 1.0), obs=y)

    _raises(model, y=Y, site="m", match=("improper",))


@pytest.mark.parametrize(
    "prior, fragment",
    [
        (dist.Normal(0.0, jnp.inf), "Normal with scale = inf"),
        (dist.Uniform(0.0, jnp.inf), "Uniform with high = inf"),
        (dist.HalfCauchy(jnp.array([1.0, jnp.inf])), "HalfCauchy with scale = inf"),
        (dist.LogNormal(0.0, jnp.inf), "Normal in LogNormal with scale = inf"),
        (dist.Normal(0.0, 1.0).expand([3]).to_event(1), None),
        (dist.TruncatedNormal(0.0, 1.0, low=-jnp.inf, high=1.0), None),
    ],
)
def test_infinite_prior_parameters(prior, fragment):
    """NumPyro accepts an infinite scale (it is 'positive'); such a prior is improper, and
    its transform would give NaN at u = 0. A one-sided truncation bound may be infinite."""

    def model(y=None):
        m = numpyro.sample("m", prior)
        numpyro.sample("y", dist.Normal(jnp.sum(m), 1.0), obs=y)

    if fragment is None:
        trace_model(model, y=Y)
    else:
        _raises(model, y=Y, site="m", match=(fragment, "improper prior"))


def test_unsupported_prior_lists_families():
    def model(y=None):
        corr = numpyro.sample("corr", dist.LKJCholesky(3, 1.0))
        numpyro.sample("y", dist.Normal(corr[1, 0], 1.0), obs=y)

    _raises(model, y=Y, site="corr", match=("LKJCholesky", "Supported prior families", "Gamma"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data(bad):
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(m, 1.0), obs=y)

    _raises(model, y=np.array([1.0, bad, 3.0]), site="y", match=("1 non-finite",))


def test_data_not_passed():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(m, 1.0).expand([3]), obs=y)

    message = _raises(model, match=("did you pass the data?", "'y'"))
    assert "no observed site" in message


def test_one_of_two_data_sets_not_passed_warns():
    def model(y1=None, y2=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y1", dist.Normal(m, 1.0).expand([3]), obs=y1)
        numpyro.sample("y2", dist.Normal(m, 1.0).expand([3]), obs=y2)

    with pytest.warns(UserWarning, match="'y2'.*If it is data, pass it"):
        problem = trace_model(model, y1=Y)
    assert [s.name for s in problem.latent_sites] == ["m", "y2"]


def test_float32_resolution_warning_names_the_coarse_site():
    """The tests run in float64, where the check is silent; asked about float32, it warns
    for the site whose noise sd (1e-6 against data up to 3: ~3 roundings) float32 barely
    resolves, and not for the other (sd 0.1: 8e5 roundings)."""
    from eki_infer.tracing.problem import _warn_about_float32_resolution

    def model(y1=None, y2=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y1", dist.Normal(1.0 + m, 1e-6).expand([3]), obs=y1)
        numpyro.sample("y2", dist.Normal(1.0 + m, 0.1).expand([3]), obs=y2)

    problem = trace_model(model, y1=Y, y2=Y)  # float64: no warning
    args = (
        problem.observed_sites,
        np.asarray(problem.observations),
        problem.probe_signature.outputs,
        problem.noise,
    )
    with pytest.warns(UserWarning, match=r"observed site\(s\) 'y1' \(\d\.\d+ roundings\)") as w:
        _warn_about_float32_resolution(*args, jnp.float32)
    assert "'y2'" not in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_about_float32_resolution(*args, jnp.float64)


def test_no_latent_site():
    def model(y=None):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    _raises(model, y=Y, match=("no latent sample site",))


def test_obs_mask():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", 3):
            numpyro.sample("y", dist.Normal(m, 1.0), obs=y, obs_mask=np.array([True, False, True]))

    _raises(model, y=Y, site="y_observed", match=("masked", "drop the missing entries"))


def test_handlers_mask():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        with handlers.mask(mask=np.array([True, True, False])):
            numpyro.sample("y", dist.Normal(m, 1.0).expand([3]), obs=y)

    _raises(model, y=Y, site="y", match=("masked",))


def test_trivial_mask_is_accepted():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        with handlers.mask(mask=True):
            numpyro.sample("y", dist.Normal(m, 1.0).expand([3]), obs=y)

    assert trace_model(model, y=Y).data_dim == 3


def test_subsampled_plate():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 3, subsample_size=2) as idx:
            numpyro.sample("y", dist.Normal(m, 1.0), obs=y[idx])

    _raises(model, y=Y, site="data", match=("subsample",))


def test_scale_handler():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        with handlers.scale(scale=0.5):
            numpyro.sample("y", dist.Normal(m, 1.0).expand([3]), obs=y)

    _raises(model, y=Y, site="y", match=("scale",))


def test_python_control_flow_on_a_latent():
    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        loc = 1.0 if m > 0 else -1.0
        numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    _raises(model, y=Y, match=("jax.jit-compatible",))


@pytest.mark.parametrize(
    ("likelihood", "fragment"),
    [
        (lambda mu: dist.Normal(mu, -0.1 * jnp.ones(3)), "Normal scale are not positive"),
        (lambda mu: dist.Normal(mu, jnp.zeros(3)), "Normal scale are not positive"),
        (
            lambda mu: dist.MultivariateNormal(mu, covariance_matrix=-jnp.eye(3)),
            "not all finite",
        ),
        (
            lambda mu: dist.LowRankMultivariateNormal(mu, jnp.ones((3, 1)), -jnp.ones(3)),
            "cov_diag are not positive",
        ),
    ],
)
def test_noise_that_is_not_a_covariance(likelihood, fragment):
    """A scale computed in the model is a tracer, which NumPyro does not validate: a
    negative one would pass as its square, a zero one give an infinite misfit."""

    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y", likelihood(m * jnp.ones(3)), obs=y)

    _raises(model, y=Y, site="y", match=(fragment, "positive definite"))


@pytest.mark.parametrize(
    ("likelihood", "fragment"),
    [
        (lambda mu: dist.Normal(mu, 1e-160), "smallest scale 1e-160"),
        (lambda mu: dist.Normal(mu, jnp.array([1.0, 1.0, 1e160])), "largest scale 1e+160"),
        (
            lambda mu: dist.LowRankMultivariateNormal(mu, jnp.ones((3, 1)), jnp.full(3, 1e-310)),
            "smallest cov_diag 1e-310",
        ),
    ],
)
def test_noise_outside_the_float_range(likelihood, fragment):
    """A scale whose square leaves the normal range of the working float type (float64
    here; in float32 a scale of 1e-20 already does) would make every misfit infinite."""

    def model(y=None):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("y", likelihood(m * jnp.ones(3)), obs=y)

    _raises(model, y=Y, site="y", match=(fragment, "normal range of float64", "Rescale"))


def test_control_flow_message_names_the_scan():
    from numpyro.contrib.control_flow import scan

    def model(y=None):
        def step(carry, _):
            x = numpyro.sample("x", dist.Normal(carry, 1.0))
            return x, x

        _, xs = scan(step, 0.0, None, length=3)
        numpyro.sample("y", dist.Normal(xs, 1.0), obs=y)

    message = _raises(model, y=Y, match=("control_flow",))
    assert "scan" in message


def test_observed_value_computed_from_a_latent():
    """A residual-form likelihood (obs=y − a x) is valid NumPyro, but the ensemble methods
    need fixed data: it was read as data at one probe point (a's posterior = its prior)."""
    x = jnp.linspace(0.0, 1.0, 3)

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 3.0))
        b = numpyro.sample("b", dist.Normal(0.0, 3.0))
        numpyro.sample("r", dist.Normal(b, 0.1).expand([3]), obs=y - a * x)

    _raises(model, y=Y, site="r", match=("observed value (obs)", "('a')", "mean"))


def test_observed_value_computed_from_a_latent_away_from_the_probe_points():
    """The same value at every probe point, computed from a latent all the same: caught by
    the structural walk over the model's jaxpr."""

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        shift = jnp.where(a > 50.0, 1.0, 0.0)
        numpyro.sample("y", dist.Normal(a, 0.1).expand([3]), obs=y + shift)

    _raises(model, y=Y, site="y", match=("observed value (obs)", "('a')"))


@pytest.mark.parametrize("kind", ["sample", "deterministic", "observed"])
def test_two_sites_of_one_name(kind):
    """NumPyro's own trace refuses repeated names; the output maps sites by name, so one
    would silently replace the other."""

    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        if kind == "sample":
            a = a + numpyro.sample("a", dist.Normal(0.0, 1.0))
        elif kind == "deterministic":
            numpyro.deterministic("a", 2.0 * a)
        else:  # the same data set observed twice under one name
            numpyro.sample("y", dist.Normal(a, 1.0).expand([3]), obs=y)
        numpyro.sample("y", dist.Normal(a, 1.0).expand([3]), obs=y)

    name = "y" if kind == "observed" else "a"
    _raises(model, y=Y, site=name, match=(f"two sites are named '{name}'", f"f'{name}_{{i}}'"))


def test_empty_sites():
    def no_data(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a, 1.0).expand([0]), obs=y)

    _raises(no_data, y=np.zeros(0), site="y", match=("no data", "(0,)"))

    def nothing_to_infer(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([0]))
        numpyro.sample("y", dist.Normal(jnp.sum(a), 1.0).expand([3]), obs=y)

    _raises(nothing_to_infer, y=Y, match=("hold no elements", "'a' (0,)"))


def test_non_numeric_data_is_refused_before_compiling():
    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a, 1.0).expand([3]), obs=y)

    _raises(model, y=np.array(["1", "2", "3"]), site="y", match=("non-numeric data",))
    # a scalar string has shape (), so a shape check first would call it a broadcast
    message = _raises(model, y="abc", site="y", match=("non-numeric data",))
    assert "broadcast" not in message
    _raises(model, y=np.array([True, False, True]), site="y", match=("dtype bool",))


@pytest.mark.parametrize(
    ("prior", "fragment"),
    [
        (dist.Uniform(1.0, 0.0), "lower bound 1.0 not below its upper bound 0.0"),
        (dist.TruncatedNormal(0.0, 1.0, low=2.0, high=1.0), "not below its upper bound"),
    ],
)
def test_prior_on_an_empty_interval(prior, fragment):
    def model(y=None):
        m = numpyro.sample("m", prior)
        numpyro.sample("y", dist.Normal(m, 1.0).expand([3]), obs=y)

    _raises(model, y=Y, site="m", match=(fragment,))


def test_prior_parameters_out_of_range_everywhere():
    """Built with jnp inside the model, the parameters are traced values at trace time;
    the probe finds them out of range at every point (every member would fail)."""

    def model(y=None):
        s = numpyro.sample("s", dist.Gamma(jnp.array([1.0, -2.0]), 1.0, validate_args=False))
        numpyro.sample("y", dist.Normal(jnp.sum(s), 1.0).expand([3]), obs=y)

    _raises(model, y=Y, site="s", match=("Gamma's concentration must be finite", "every point"))


def test_prior_parameters_from_model_arguments_and_params_read_twice():
    """Array model arguments reach the compiled probe as traced values (the discovery run
    sees them concrete): the parameter checks still line up. A numpyro.param read twice
    is one parameter, as in NumPyro's own trace."""

    def model(prior_sd, lo, hi, y=None):
        a = numpyro.sample("a", dist.Normal(0.0, prior_sd))
        b = numpyro.sample("b", dist.Uniform(lo, hi))
        s = numpyro.param("s", 1.0) * numpyro.param("s", 1.0)
        numpyro.sample("y", dist.Normal(a + b, 0.1 * s).expand([3]), obs=y)

    with pytest.warns(UserWarning, match="param sites 's' are held"):
        problem = trace_model(model, np.array(2.0), np.array(0.0), np.array(1.0), y=Y)
    assert problem.dim == 2
    with pytest.raises(ModelTracingError, match=r"lower bound 1\.0 not below its upper bound"):
        trace_model(model, np.array(2.0), np.array(1.0), np.array(0.0), y=Y)

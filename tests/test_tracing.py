"""trace_model: sites, forward map, observations, noise Γ and pointwise log-likelihood
against what the model itself computes when conditioned on the transformed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from eki_infer.noise import BlockNoise, DenseNoise, DiagonalNoise, LowRankNoise, ScalarNoise
from eki_infer.tracing import InverseProblem, ModelTracingError, trace_model

T = np.linspace(0.0, 2.0, 5)
COV = np.array([[1.0, 0.3, 0.1], [0.3, 0.5, -0.1], [0.1, -0.1, 0.8]])
FACTOR = np.array([[0.5, 0.1], [0.2, -0.3], [0.0, 0.4]])
DIAG = np.array([0.3, 0.2, 0.1])


def normal_model(t, y=None):
    a = numpyro.sample("a", dist.Normal(1.0, 1.0))
    b = numpyro.sample("b", dist.HalfNormal(1.0))
    numpyro.deterministic("curve", a * jnp.sin(t) + b)
    numpyro.sample("y", dist.Normal(a * jnp.sin(t) + b, 0.2), obs=y)


def plate_model(t, sigma, y=None):
    """Normal in a plate with a per-element scale that broadcasts against the loc."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("time", len(t)):
        numpyro.sample("y", dist.Normal(w[0] + w[1] * t, sigma), obs=y)


def to_event_model(y=None):
    """A (2, 3) Normal with .to_event(2) and a scale that broadcasts over rows."""
    m = numpyro.sample("m", dist.Normal(0.0, 1.0))
    loc = m * jnp.arange(6.0).reshape(2, 3)
    scale = jnp.array([0.1, 0.2, 0.3])
    numpyro.sample("y", dist.Normal(loc, scale).to_event(2), obs=y)


def mvn_model(kind, y=None):
    x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    arg = {
        "covariance_matrix": COV,
        "precision_matrix": np.linalg.inv(COV),
        "scale_tril": np.linalg.cholesky(COV),
    }[kind]
    numpyro.sample("y", dist.MultivariateNormal(jnp.cumsum(x), **{kind: arg}), obs=y)


def low_rank_model(y=None):
    x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("y", dist.LowRankMultivariateNormal(x**2, FACTOR, DIAG), obs=y)


def batched_mvn_model(y=None, z=None):
    """A plate of MVN events, a plate of low-rank events, and a scalar Normal site."""
    s = numpyro.sample("s", dist.Exponential(1.0))
    with numpyro.plate("groups", 2):
        numpyro.sample("y", dist.MultivariateNormal(s * jnp.ones(3), COV), obs=y)
        numpyro.sample("z", dist.LowRankMultivariateNormal(-s * jnp.ones(3), FACTOR, DIAG), obs=z)
    numpyro.sample("r", dist.Normal(s, 0.5), obs=1.0)


def mvn_to_event_model(y=None):
    """Two MVN events reinterpreted as one (.expand([2]).to_event(1)): one log-density."""
    s = numpyro.sample("s", dist.Normal(0.0, 1.0))
    numpyro.sample(
        "y", dist.MultivariateNormal(s * jnp.ones(3), COV).expand([2]).to_event(1), obs=y
    )


CASES = {
    "normal": (normal_model, (T,), {"y": np.cos(T)}),
    "plate": (plate_model, (T, np.linspace(0.1, 0.5, 5)), {"y": T**2}),
    "to_event": (to_event_model, (), {"y": np.ones((2, 3))}),
    "mvn-cov": (mvn_model, ("covariance_matrix",), {"y": np.array([0.1, 0.2, 0.3])}),
    "mvn-precision": (mvn_model, ("precision_matrix",), {"y": np.array([0.1, 0.2, 0.3])}),
    "mvn-tril": (mvn_model, ("scale_tril",), {"y": np.array([0.1, 0.2, 0.3])}),
    "low_rank": (low_rank_model, (), {"y": np.array([1.0, 0.5, 2.0])}),
    "batched": (batched_mvn_model, (), {"y": np.ones((2, 3)), "z": -np.ones((2, 3))}),
    "mvn_to_event": (mvn_to_event_model, (), {"y": np.ones((2, 3))}),
}


@functools.cache
def traced(name) -> InverseProblem:
    model, args, kwargs = CASES[name]
    return trace_model(model, *args, **kwargs)


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param, traced(request.param)


def _model_trace(problem: InverseProblem, u):
    """The model's own trace with the latents set to prior_transform(u)."""
    values = problem.prior_transform(u)
    latent = {s.name: values[s.name] for s in problem.latent_sites}
    conditioned = handlers.substitute(handlers.seed(problem.model, 0), latent)
    return handlers.trace(conditioned).get_trace(*problem.model_args, **problem.model_kwargs)


def _dense_covariance(fn, shape):
    """Γ of one observed site from the distribution itself, by brute force."""
    while isinstance(fn, dist.ExpandedDistribution | dist.Independent):
        fn = fn.base_dist
    if isinstance(fn, dist.Normal):
        return np.diag(np.broadcast_to(np.asarray(fn.scale) ** 2, shape).ravel())
    cov = np.broadcast_to(np.asarray(fn.covariance_matrix), (*shape[:-1], shape[-1], shape[-1]))
    blocks = cov.reshape(-1, shape[-1], shape[-1])
    return jax.scipy.linalg.block_diag(*blocks)


def test_forward_noise_and_loglik_match_the_model(case):
    name, problem = case
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(len(name)), (problem.dim,)))
    tr = _model_trace(problem, u)
    obs_sites = [s for s in tr.values() if s["type"] == "sample" and s["is_observed"]]
    assert [s["name"] for s in obs_sites] == [s.name for s in problem.observed_sites]

    # forward map = the observed sites' means, broadcast to their shapes, concatenated
    z = problem.forward(u)
    expected = np.concatenate(
        [
            np.broadcast_to(s["fn"].mean, o.shape).ravel()
            for s, o in zip(obs_sites, problem.observed_sites, strict=True)
        ]
    )
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)

    # observations
    y = np.concatenate(
        [
            np.broadcast_to(s["value"], o.shape).ravel()
            for s, o in zip(obs_sites, problem.observed_sites, strict=True)
        ]
    )
    np.testing.assert_array_equal(problem.observations, y)
    assert problem.observations.shape == (problem.data_dim,)

    # noise = the distributions' covariance
    gamma = jax.scipy.linalg.block_diag(
        *[
            _dense_covariance(s["fn"], o.shape)
            for s, o in zip(obs_sites, problem.observed_sites, strict=True)
        ]
    )
    np.testing.assert_allclose(problem.noise.to_dense(), gamma, rtol=1e-10, atol=1e-12)
    assert problem.noise.dim == problem.data_dim

    # pointwise log-likelihood sums to the model's log-density of each site
    pointwise = problem.pointwise_log_likelihood(u)
    for s, o in zip(obs_sites, problem.observed_sites, strict=True):
        lp = pointwise[o.name]
        # per event, as NumPyro's log_prob: the distribution's event dims are summed
        assert o.density_ndim == len(s["fn"].event_shape)
        assert lp.shape == o.shape[: len(o.shape) - o.density_ndim]
        np.testing.assert_allclose(lp, s["fn"].log_prob(s["value"]), rtol=1e-12)
    total = sum(v.sum() for v in pointwise.values())
    np.testing.assert_allclose(problem.log_likelihood(u), total, rtol=1e-10)

    # one execution gives both
    values, z2 = problem.transform_and_forward(u)
    np.testing.assert_allclose(z2, z, rtol=1e-14)
    assert set(values) == {s.name for s in problem.latent_sites} | {
        s.name for s in problem.deterministic_sites
    }


def test_noise_structure():
    expected = {
        "normal": ScalarNoise,
        "plate": DiagonalNoise,
        "to_event": DiagonalNoise,
        "mvn-cov": DenseNoise,
        "low_rank": LowRankNoise,
        "batched": BlockNoise,
    }
    for name, cls in expected.items():
        assert type(traced(name).noise) is cls, name
    # a plate of MVN or low-rank events keeps one block per event
    assert [type(b).__name__ for b in traced("batched").noise.blocks] == [
        "EventBlocksNoise",
        "EventBlocksNoise",
        "ScalarNoise",
    ]


@pytest.mark.parametrize("family", ["mvn", "low_rank"])
def test_a_plate_of_events_forms_no_data_sized_matrix(family):
    """400 events of size 3: Γ is 1200 × 1200, its parts are (400, 3, 3) or smaller."""
    events = 400

    def model(y=None):
        s = numpyro.sample("s", dist.Normal(0.0, 1.0))
        with numpyro.plate("events", events):
            if family == "mvn":
                likelihood = dist.MultivariateNormal(s * jnp.ones(3), COV)
            else:
                likelihood = dist.LowRankMultivariateNormal(s * jnp.ones(3), FACTOR, DIAG)
            numpyro.sample("y", likelihood, obs=y)

    y = np.random.default_rng(0).normal(size=(events, 3))
    problem = trace_model(model, y=y)
    leaves = jax.tree_util.tree_leaves(problem.noise)
    assert max(np.size(leaf) for leaf in leaves) <= events * 3 * 3
    dense = COV if family == "mvn" else FACTOR @ FACTOR.T + np.diag(DIAG)
    r = np.random.default_rng(1).normal(size=(2, events * 3))
    per_event = r.reshape(2, events, 3)
    expected = 0.5 * np.einsum("bni,ij,bnj->b", per_event, np.linalg.inv(dense), per_event)
    np.testing.assert_allclose(problem.noise.misfit(r), expected, rtol=1e-10)


def test_pointwise_log_likelihood_is_per_event_as_numpyro_gives_it():
    """A .to_event site is one observation (its elements summed), a plate site one per
    plate element: the shapes and values of numpyro.infer.util.log_likelihood, so that
    LOO and az.compare line up with a NUTS run of the same model."""
    from numpyro.infer.util import log_likelihood

    problem = traced("to_event")
    u = np.array([0.7])
    lp = problem.pointwise_log_likelihood(u)["y"]
    m = float(problem.prior_transform(u)["m"])
    elements = dist.Normal(m * np.arange(6.0).reshape(2, 3), np.array([0.1, 0.2, 0.3]))
    assert lp.shape == ()
    np.testing.assert_allclose(lp, elements.log_prob(1.0).sum(), rtol=1e-12)
    for name in ("to_event", "plate", "batched", "normal", "mvn_to_event"):
        problem = traced(name)
        model, args, kwargs = CASES[name]
        U = jax.random.normal(jax.random.PRNGKey(3), (4, problem.dim))
        values = jax.vmap(problem.prior_transform)(U)
        latents = {s.name: values[s.name] for s in problem.latent_sites}
        reference = log_likelihood(model, latents, *args, **kwargs)
        ours = jax.vmap(problem.pointwise_log_likelihood)(U)
        for site, value in reference.items():
            np.testing.assert_allclose(ours[site], value, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pointwise_log_likelihood_from_outputs_needs_no_model_run(name):
    """The run's outputs and Γ give the same per-event log-likelihood as the model's own
    distributions (every family, plates of multivariate events, .to_event), so the
    ArviZ log_likelihood group costs no second forward run; failed outputs give NaN."""
    problem = traced(name)
    U = jax.random.normal(jax.random.PRNGKey(4), (2, 3, problem.dim))
    expected = problem.pointwise_log_likelihood(U)
    outputs = problem.forward(U)
    ours = problem.pointwise_log_likelihood_from_outputs(outputs)
    assert set(ours) == set(expected)
    for site, value in expected.items():
        assert ours[site].shape == value.shape, site
        np.testing.assert_allclose(ours[site], value, rtol=1e-10, atol=1e-10, err_msg=name)
    failed = problem.pointwise_log_likelihood_from_outputs(outputs.at[0, 1].set(jnp.nan))
    for site in failed.values():
        assert np.all(np.isnan(site[0, 1])) and np.all(np.isfinite(site[1]))


def test_sites_dims_and_unflatten():
    problem = traced("batched")
    assert problem.dim == 1 and problem.data_dim == 6 + 6 + 1
    y, z, r = problem.observed_sites
    assert (y.name, y.shape, y.start, y.stop, y.dims) == ("y", (2, 3), 0, 6, ("groups", "y_dim_1"))
    assert (z.start, z.stop, z.family) == (6, 12, "LowRankMultivariateNormal")
    assert (r.shape, r.dims, r.start, r.stop) == ((), (), 12, 13)
    parts = problem.unflatten_observations(problem.observations)
    np.testing.assert_array_equal(parts["y"], np.ones((2, 3)))
    np.testing.assert_array_equal(parts["r"], 1.0)
    batch = problem.unflatten_observations(jnp.zeros((4, 5, problem.data_dim)))
    assert batch["z"].shape == (4, 5, 2, 3) and batch["r"].shape == (4, 5)
    ll = problem.pointwise_log_likelihood(np.array([0.3]))
    assert ll["y"].shape == (2,) and ll["z"].shape == (2,) and ll["r"].shape == ()

    normal = traced("normal")
    assert [s.name for s in normal.latent_sites] == ["a", "b"]
    assert [(s.start, s.stop, s.family) for s in normal.latent_sites] == [
        (0, 1, "Normal"),
        (1, 2, "HalfNormal"),
    ]
    (curve,) = normal.deterministic_sites
    assert curve.name == "curve" and curve.shape == (5,) and curve.dims == ("curve_dim_0",)
    assert "InverseProblem(d=2, M=5" in repr(normal)


def test_jit_vmap_and_batched_inputs():
    problem = traced("plate")
    U = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, problem.dim)))
    Z = jax.jit(jax.vmap(problem.forward))(U)
    assert Z.shape == (6, problem.data_dim)
    for i in (0, 5):
        np.testing.assert_allclose(Z[i], problem.forward(U[i]), rtol=1e-13)
    np.testing.assert_allclose(
        problem.forward(U.reshape(2, 3, -1)), Z.reshape(2, 3, -1), rtol=1e-13
    )
    values = jax.jit(jax.vmap(problem.prior_transform))(U)
    assert values["w"].shape == (6, 2)
    values2, Z2 = jax.jit(problem.transform_and_forward)(U)
    np.testing.assert_allclose(values2["w"], values["w"], rtol=1e-13)
    np.testing.assert_allclose(Z2, Z, rtol=1e-13)
    ll = jax.jit(jax.vmap(problem.pointwise_log_likelihood))(U)
    assert ll["y"].shape == (6, 5)
    # the problem is hashable by identity, so it can be a static jit argument
    f = jax.jit(lambda p, u: p.forward(u), static_argnums=0)
    np.testing.assert_allclose(f(problem, U[0]), Z[0], rtol=1e-13)


def test_sample_observations_draws_from_the_likelihood():
    problem = traced("mvn-cov")
    u = np.array([0.5, -1.0, 2.0])
    U = np.tile(u, (4000, 1))
    draws = problem.sample_observations(jax.random.PRNGKey(3), U)["y"]
    assert draws.shape == (4000, 3)
    mean = problem.forward(u)
    assert np.all(np.abs(draws.mean(0) - mean) < 4 * np.sqrt(np.diag(COV) / 4000))
    np.testing.assert_allclose(np.cov(np.asarray(draws).T), COV, atol=0.08)
    one = problem.sample_observations(jax.random.PRNGKey(3), u)
    assert one["y"].shape == (3,)


def test_substituted_sites_are_constants_and_params_are_held_with_a_warning():
    def model(y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        offset = numpyro.param("offset", 0.5)
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + offset, sigma), obs=y)

    fixed = handlers.substitute(model, {"sigma": 0.3})
    with pytest.warns(UserWarning, match="numpyro.param sites 'offset' are held at their"):
        problem = trace_model(fixed, y=np.array([1.0, 2.0]))
    assert [s.name for s in problem.latent_sites] == ["mu"]
    np.testing.assert_allclose(problem.noise.to_dense(), 0.09 * np.eye(2))
    np.testing.assert_allclose(problem.forward(np.array([0.0])), [0.5, 0.5])

    def only_params(y=None):
        numpyro.sample("y", dist.Normal(numpyro.param("level", 0.5), 1.0), obs=y)

    with pytest.raises(ModelTracingError, match=r"numpyro.param sites \('level'\) are not"):
        trace_model(only_params, y=np.array([1.0]))


def test_multiple_sites_in_model_order_and_data_broadcast():
    def model(y1=None, y2=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y2", dist.Normal(a, 2.0), obs=y2)  # scalar loc, vector data
        b = numpyro.sample("b", dist.Uniform(0.0, 1.0))
        numpyro.sample("y1", dist.Normal(a + b, jnp.array([0.1, 0.2])), obs=y1)

    problem = trace_model(model, y1=np.array([1.0, 2.0]), y2=np.array([3.0, 4.0, 5.0]))
    assert [s.name for s in problem.observed_sites] == ["y2", "y1"]
    assert problem.observed_sites[0].shape == (3,)
    np.testing.assert_array_equal(problem.observations, [3.0, 4.0, 5.0, 1.0, 2.0])
    np.testing.assert_allclose(problem.noise.variances(), [4.0, 4.0, 4.0, 0.01, 0.04])
    z = problem.forward(np.array([1.0, 0.0]))
    np.testing.assert_allclose(z, [1.0, 1.0, 1.0, 1.5, 1.5])

"""Whitened prior transforms: u ~ N(0, I) pushed through them gives exactly the prior.

Three kinds of evidence, all at fixed seeds:

- exactness: at fixed u the value equals the family's quantile at Φ(u), taken from scipy
  (``ppf`` for u <= 0, ``isf`` of Φ(−u) for u > 0) to 1e-9 relative;
- distribution: 4000 draws pass a Kolmogorov–Smirnov test against the family's cdf at
  level 0.001 (with fixed seeds these either pass or fail deterministically; a correct
  transform fails with probability 0.001 per test for a fresh seed);
- numerical inversion: cdf(quantile(p)) = p to 1e-10 relative, in log space, over
  u in [−37, 37] (p down to 1e-300), wherever the quantile is a normal float.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.special as sc
import scipy.stats as st
from numpyro.distributions.transforms import AffineTransform

from eki_infer.tracing import ModelTracingError, trace_model, whitened_shape, whitened_transform
from eki_infer.tracing.priors import (
    _log_ndtr,
    beta_logit_quantile,
    gamma_log_quantile,
    studentt_quantile,
)

N = 4000
KS_LEVEL = 1e-3


def _normal_draws(seed, shape):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))


def _ks_pvalue(values, cdf):
    return st.kstest(np.asarray(values).ravel(), cdf).pvalue


# (name, numpyro distribution, scipy frozen distribution or None, numpyro-cdf fallback)
FAMILIES = [
    ("Normal", dist.Normal(1.0, 2.0), st.norm(1.0, 2.0)),
    ("HalfNormal", dist.HalfNormal(2.0), st.halfnorm(scale=2.0)),
    ("Cauchy", dist.Cauchy(1.0, 2.0), st.cauchy(1.0, 2.0)),
    ("HalfCauchy", dist.HalfCauchy(2.0), st.halfcauchy(scale=2.0)),
    ("Exponential", dist.Exponential(3.0), st.expon(scale=1 / 3.0)),
    ("Laplace", dist.Laplace(1.0, 2.0), st.laplace(1.0, 2.0)),
    ("Logistic", dist.Logistic(1.0, 2.0), st.logistic(1.0, 2.0)),
    ("Gumbel", dist.Gumbel(1.0, 2.0), st.gumbel_r(1.0, 2.0)),
    ("Uniform", dist.Uniform(-1.0, 3.0), st.uniform(-1.0, 4.0)),
    ("Weibull", dist.Weibull(2.0, 1.5), st.weibull_min(1.5, scale=2.0)),
    ("Levy", dist.Levy(0.5, 2.0), st.levy(0.5, 2.0)),
    ("Gompertz", dist.Gompertz(2.0, 0.5), st.gompertz(2.0, scale=2.0)),
    ("Kumaraswamy", dist.Kumaraswamy(2.0, 3.0), None),
    ("Gamma-small", dist.Gamma(0.3, 2.0), st.gamma(0.3, scale=0.5)),
    ("Gamma", dist.Gamma(5.0, 0.5), st.gamma(5.0, scale=2.0)),
    ("Chi2", dist.Chi2(3.0), st.chi2(3.0)),
    ("Beta-arcsine", dist.Beta(0.5, 0.5), st.beta(0.5, 0.5)),
    ("Beta", dist.Beta(2.0, 5.0), st.beta(2.0, 5.0)),
    ("BetaProportion", dist.BetaProportion(0.3, 10.0), st.beta(3.0, 7.0)),
    ("StudentT", dist.StudentT(3.0, 1.0, 2.0), st.t(3.0, 1.0, 2.0)),
    ("StudentT-heavy", dist.StudentT(0.8), st.t(0.8)),
    ("LogNormal", dist.LogNormal(0.0, 0.5), st.lognorm(0.5)),
    ("InverseGamma", dist.InverseGamma(3.0, 2.0), st.invgamma(3.0, scale=2.0)),
    ("Pareto", dist.Pareto(2.0, 3.0), st.pareto(3.0, scale=2.0)),
    ("LogUniform", dist.LogUniform(0.1, 10.0), st.loguniform(0.1, 10.0)),
    ("TruncatedNormal-left", dist.TruncatedNormal(0.0, 1.0, low=0.5), st.truncnorm(0.5, np.inf)),
    (
        "TruncatedNormal-two-sided",
        dist.TruncatedNormal(1.0, 2.0, low=-1.0, high=2.0),
        st.truncnorm(-1.0, 0.5, loc=1.0, scale=2.0),
    ),
    # NumPyro's StudentT icdf needs tensorflow_probability; truncations use our quantile
    (
        "TruncatedStudentT-left",
        dist.TruncatedDistribution(dist.StudentT(3.0, 0.5, 2.0), low=0.0),
        None,
    ),
    (
        "TruncatedStudentT-two-sided",
        dist.TruncatedDistribution(dist.StudentT(1.5, 0.0, 1.0), low=-1.0, high=4.0),
        None,
    ),
    ("AsymmetricLaplace", dist.AsymmetricLaplace(0.5, 2.0, 1.5), None),
    ("SoftLaplace", dist.SoftLaplace(1.0, 2.0), None),
    (
        "Transformed-Gamma",
        dist.TransformedDistribution(dist.Gamma(2.0, 1.0), AffineTransform(1.0, 3.0)),
        st.gamma(2.0, loc=1.0, scale=3.0),
    ),
]
# closed-form cdfs where neither scipy nor numpyro has one
_KUMARASWAMY_CDF = lambda x: 1.0 - (1.0 - np.clip(x, 0, 1) ** 2.0) ** 3.0  # noqa: E731


def _cdf_for(fn, reference):
    if reference is not None:
        return reference.cdf
    if isinstance(fn, dist.Kumaraswamy):
        return _KUMARASWAMY_CDF
    return lambda x: np.asarray(fn.cdf(jnp.asarray(x)))


GRID = np.linspace(-6.0, 6.0, 25)


@pytest.mark.parametrize("name, fn, reference", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family(name, fn, reference):
    """KS test of 4000 draws; exact monotone quantiles on a grid (one transform call)."""
    u = np.concatenate([GRID, _normal_draws(sum(map(ord, name)), (N,))])
    values = np.asarray(whitened_transform(fn.expand(u.shape), u))
    grid_values, values = values[: len(GRID)], values[len(GRID) :]
    assert np.all(np.isfinite(values))
    assert np.all(np.asarray(fn.support(values)))
    p = _ks_pvalue(values, _cdf_for(fn, reference))
    assert p > KS_LEVEL, f"{name}: KS p-value {p:.2e}"
    assert np.all(np.diff(grid_values) >= 0)
    if reference is not None:
        expected = np.where(
            GRID <= 0, reference.ppf(st.norm.cdf(GRID)), reference.isf(st.norm.sf(GRID))
        )
        np.testing.assert_allclose(grid_values, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("low", "high"), [(0.0, None), (None, 1.0), (-1.0, 2.0), (3.0, None)])
def test_truncated_studentt_quantiles(low, high):
    """ppf(F(low) + Φ(u) (F(high) − F(low))) of the base StudentT, against scipy (|u| ≤ 4,
    where scipy's ppf is accurate)."""
    bounds = {k: v for k, v in (("low", low), ("high", high)) if v is not None}
    u = np.linspace(-4.0, 4.0, 17)
    fn = dist.TruncatedDistribution(dist.StudentT(3.0, 0.5, 2.0), **bounds)
    values = np.asarray(whitened_transform(fn.expand(u.shape), u))
    base = st.t(3.0, 0.5, 2.0)
    lo = 0.0 if low is None else base.cdf(low)
    hi = 1.0 if high is None else base.cdf(high)
    np.testing.assert_allclose(values, base.ppf(lo + st.norm.cdf(u) * (hi - lo)), rtol=1e-8)


def test_kumaraswamy_exact_quantiles():
    u = np.linspace(-6.0, 6.0, 25)
    values = np.asarray(whitened_transform(dist.Kumaraswamy(2.0, 3.0).expand(u.shape), u))
    np.testing.assert_allclose(_KUMARASWAMY_CDF(values), st.norm.cdf(u), rtol=1e-9, atol=1e-15)


def test_right_tail_does_not_saturate():
    """The symmetric form keeps distinct, finite values far beyond Φ(u) = 1 in float64."""
    u = np.array([8.0, 10.0, 20.0, 25.0])
    for fn in [dist.HalfNormal(1.0), dist.Exponential(1.0), dist.Levy(0, 1), dist.Cauchy(0, 1)]:
        values = np.asarray(whitened_transform(fn.expand(u.shape), u))
        assert np.all(np.isfinite(values)) and np.all(np.diff(values) > 0), type(fn).__name__


# --------------------------------------------------------------------------------------
# numerical inversion: cdf(icdf(p)) = p to 1e-10 relative over the whole range

U_GRID = np.concatenate([np.linspace(-37.0, 37.0, 75), [-1e-3, 0.0, 1e-3]])
LOG_P = np.where(U_GRID <= 0, sc.log_ndtr(U_GRID), sc.log_ndtr(-U_GRID))


def test_log_ndtr_is_accurate_in_the_far_tail():
    x = np.array([-5.0, -19.99, -20.0, -25.0, -37.0, -100.0])
    np.testing.assert_allclose(np.asarray(_log_ndtr(x)), sc.log_ndtr(x), rtol=1e-14)


@pytest.mark.parametrize("a", [0.01, 0.3, 1.0, 4.5, 100.0])
def test_gamma_inversion_accuracy(a):
    t = np.asarray(jax.jit(gamma_log_quantile)(a, U_GRID))
    x = np.exp(t)
    log_c = np.where(U_GRID <= 0, sc.gammainc(a, x), sc.gammaincc(a, x))
    ok = (x > np.finfo(float).tiny) & np.isfinite(x)
    assert ok.sum() > 40
    np.testing.assert_allclose(np.log(log_c[ok]), LOG_P[ok], rtol=0, atol=1e-10)
    # numpyro's own cdf, on the lower half: cdf(icdf(p)) = p
    lower = ok & (U_GRID <= 0)
    cdf = np.asarray(dist.Gamma(a).cdf(jnp.asarray(x[lower])))
    np.testing.assert_allclose(cdf, np.exp(LOG_P[lower]), rtol=1e-10, atol=0)


@pytest.mark.parametrize("a, b", [(0.1, 0.1), (0.5, 0.5), (2.0, 5.0), (50.0, 3.0), (0.05, 20.0)])
def test_beta_inversion_accuracy(a, b):
    t = np.asarray(jax.jit(beta_logit_quantile)(a, b, U_GRID))
    x, xc = sc.expit(t), sc.expit(-t)
    # reference: the regularised incomplete beta on the argument that is not near 1
    lower = np.where(x <= 0.5, sc.betainc(a, b, x), 1.0 - sc.betainc(b, a, xc))
    upper = np.where(x > 0.5, sc.betainc(b, a, xc), 1.0 - sc.betainc(a, b, x))
    ref = np.where(U_GRID <= 0, lower, upper)
    well_conditioned = np.where(U_GRID <= 0, (x <= 0.5) | (lower > 0.1), (x > 0.5) | (upper > 0.1))
    ok = well_conditioned & (np.minimum(x, xc) > np.finfo(float).tiny)
    assert ok.sum() > 20
    np.testing.assert_allclose(np.log(ref[ok]), LOG_P[ok], rtol=0, atol=1e-10)
    # the two tails mirror each other: Beta(a, b) at u is 1 − Beta(b, a) at −u
    mirror = np.asarray(jax.jit(beta_logit_quantile)(b, a, -U_GRID))
    np.testing.assert_allclose(t, -mirror, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("df", [0.5, 1.0, 3.0, 30.0])
def test_studentt_inversion_accuracy(df):
    z = np.asarray(jax.jit(studentt_quantile)(df, U_GRID))
    # reference: scipy's t near the centre; in the tails (where scipy's t.logcdf gives up)
    # F(−|z|) = ½ I_{ν/(ν+z²)}(ν/2, ½) with scipy's betainc, accurate for small arguments
    with np.errstate(all="ignore"):
        w = df / z**2 / (1.0 + df / z**2)
        tail = np.log(0.5 * sc.betainc(df / 2, 0.5, w))
    centre = np.where(U_GRID <= 0, st.t.logcdf(z, df), st.t.logsf(z, df))
    log_c = np.where(np.abs(z) > 1e3, tail, centre)
    ok = np.isfinite(log_c) & (w > 1e-300)
    assert ok.sum() > 30
    np.testing.assert_allclose(log_c[ok], LOG_P[ok], rtol=0, atol=1e-10)
    mirror = np.asarray(jax.jit(studentt_quantile)(df, -U_GRID))
    np.testing.assert_array_equal(z, -mirror)


def test_numerical_inversion_float32():
    u = np.linspace(-9.0, 9.0, 37).astype(np.float32)
    lp = np.where(u <= 0, sc.log_ndtr(u.astype(float)), sc.log_ndtr(-u.astype(float)))
    t = gamma_log_quantile(jnp.float32(2.5), jnp.asarray(u))
    assert t.dtype == jnp.float32
    x = np.exp(np.asarray(t, dtype=float))
    log_c = np.where(u <= 0, st.gamma.logcdf(x, 2.5), st.gamma.logsf(x, 2.5))
    np.testing.assert_allclose(log_c, lp, atol=2e-5)
    z = studentt_quantile(jnp.float32(3.0), jnp.asarray(u))
    assert z.dtype == jnp.float32
    log_c = np.where(u <= 0, st.t.logcdf(z, 3.0), st.t.logsf(z, 3.0))
    np.testing.assert_allclose(log_c, lp, atol=2e-5)


def test_transform_is_deterministic_and_batch_independent():
    """Same u, same value: repeated, alone or inside a batch."""
    fn = dist.Gamma(jnp.array([0.5, 2.0, 30.0]), 1.5)
    transform = jax.jit(jax.vmap(lambda v: whitened_transform(fn, v)))
    u = _normal_draws(3, (64, 3))
    batch = np.asarray(transform(u))
    np.testing.assert_array_equal(batch, np.asarray(transform(u)))
    alone = np.asarray(transform(u[17:18]))[0]
    np.testing.assert_allclose(alone, batch[17], rtol=1e-14)


# --------------------------------------------------------------------------------------
# wrappers, plates, hierarchies, multivariate families, through trace_model


def _prior_draws(model, *args, seed=0, n=N, **kwargs):
    problem = trace_model(model, *args, **kwargs)
    u = _normal_draws(seed, (n, problem.dim))
    return problem, jax.jit(jax.vmap(problem.prior_transform))(u)


def test_eight_schools_hierarchy():
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])

    def eight_schools(sigma, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("school", len(sigma)):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    problem, draws = _prior_draws(eight_schools, sigma, y=y, seed=8)
    assert problem.dim == 10
    mu, tau, theta = (np.asarray(draws[k]) for k in ("mu", "tau", "theta"))
    assert theta.shape == (N, 8)
    assert _ks_pvalue(mu, st.norm(0, 5).cdf) > KS_LEVEL
    assert _ks_pvalue(tau, st.halfcauchy(scale=5).cdf) > KS_LEVEL
    standardised = (theta - mu[:, None]) / tau[:, None]
    for j in range(8):
        assert _ks_pvalue(standardised[:, j], st.norm.cdf) > KS_LEVEL
    # and marginally theta_j is the normal scale mixture: compare with direct sampling
    rng = np.random.default_rng(1)
    direct = rng.normal(0, 5, 20000) + 5 * np.abs(rng.standard_cauchy(20000)) * rng.normal(
        size=20000
    )
    assert st.ks_2samp(theta[:, 0], direct).pvalue > KS_LEVEL


def test_hierarchical_gamma_on_latent_parameters():
    """A numerically inverted family whose parameters are earlier latents."""

    def model(y=None):
        a = numpyro.sample("a", dist.LogNormal(0.0, 0.5))
        rate = numpyro.sample("rate", dist.Exponential(1.0))
        x = numpyro.sample("x", dist.Gamma(a, rate))
        numpyro.sample("y", dist.Normal(x, 1.0), obs=y)

    _, draws = _prior_draws(model, y=1.0, seed=11)
    a, rate, x = (np.asarray(draws[k]) for k in ("a", "rate", "x"))
    # conditional cdf values are Uniform(0, 1) exactly when x | a, rate ~ Gamma(a, rate)
    pit = st.gamma.cdf(x * rate, a)
    assert _ks_pvalue(pit, st.uniform.cdf) > KS_LEVEL


def test_plates_expand_and_to_event():
    def model(y=None):
        with numpyro.plate("rows", 3, dim=-2), numpyro.plate("cols", 2, dim=-1):
            a = numpyro.sample("a", dist.Exponential(2.0))
        b = numpyro.sample("b", dist.Normal(jnp.array([0.0, 1.0, 2.0]), 1.0).to_event(1))
        c = numpyro.sample("c", dist.Uniform(-1.0, 2.0).expand([4]).to_event(1))
        with numpyro.plate("rows", 3):
            e = numpyro.sample("e", dist.HalfNormal(1.0).expand([3, 2]).to_event(1))
        mean = a.sum() + b.sum() + c.sum() + e.sum()
        numpyro.sample("y", dist.Normal(mean, 1.0), obs=y)

    problem, draws = _prior_draws(model, y=0.0, seed=5)
    sites = {s.name: s for s in problem.latent_sites}
    assert sites["a"].shape == (3, 2) and sites["a"].dims == ("rows", "cols")
    assert sites["b"].shape == (3,) and sites["b"].dims == ("b_dim_0",)
    assert sites["c"].shape == (4,)
    assert sites["e"].shape == (3, 2) and sites["e"].dims == ("rows", "e_dim_1")
    assert problem.dim == 6 + 3 + 4 + 6
    a = np.asarray(draws["a"]).reshape(N, -1)
    assert _ks_pvalue(a, st.expon(scale=0.5).cdf) > KS_LEVEL
    b = np.asarray(draws["b"]) - np.array([0.0, 1.0, 2.0])
    assert _ks_pvalue(b, st.norm.cdf) > KS_LEVEL
    assert _ks_pvalue(draws["c"], st.uniform(-1.0, 3.0).cdf) > KS_LEVEL
    assert _ks_pvalue(draws["e"], st.halfnorm.cdf) > KS_LEVEL
    # elements are independent: correlations within 4 standard errors of zero
    corr = np.corrcoef(a.T)[np.triu_indices(6, 1)]
    assert np.all(np.abs(corr) < 4 / np.sqrt(N))


def test_sample_shape_site():
    def model(y=None):
        x = numpyro.sample("x", dist.Exponential(2.0), sample_shape=(5,))
        numpyro.sample("y", dist.Normal(x.sum(), 1.0), obs=y)

    problem, draws = _prior_draws(model, y=0.0, seed=6)
    assert problem.dim == 5 and draws["x"].shape == (N, 5)
    assert _ks_pvalue(draws["x"], st.expon(scale=0.5).cdf) > KS_LEVEL


def test_multivariate_normal_prior():
    loc = np.array([1.0, -2.0, 0.5])
    cov = np.array([[2.0, 0.6, 0.2], [0.6, 1.0, -0.3], [0.2, -0.3, 0.5]])

    def model(y=None, kind="covariance_matrix"):
        arg = {
            "covariance_matrix": cov,
            "precision_matrix": np.linalg.inv(cov),
            "scale_tril": np.linalg.cholesky(cov),
        }[kind]
        x = numpyro.sample("x", dist.MultivariateNormal(loc, **{kind: arg}))
        numpyro.sample("y", dist.Normal(x.sum(), 1.0), obs=y)

    for kind in ("covariance_matrix", "precision_matrix", "scale_tril"):
        _, draws = _prior_draws(model, y=0.0, kind=kind, seed=7)
        x = np.asarray(draws["x"])
        # exact: the affine map loc + L u
        u = _normal_draws(7, (N, 3))
        np.testing.assert_allclose(x, loc + u @ np.linalg.cholesky(cov).T, atol=1e-10)
    se = np.sqrt(np.diag(cov) / N)
    assert np.all(np.abs(x.mean(0) - loc) < 4 * se)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.12)


def test_batched_mvn_and_low_rank_priors():
    factor = np.array([[1.0, 0.0], [0.5, 1.0], [0.0, -1.0]])
    diag = np.array([0.5, 0.2, 1.0])

    def model(y=None):
        with numpyro.plate("groups", 2):
            x = numpyro.sample("x", dist.MultivariateNormal(np.zeros(3), np.eye(3) * 2.0))
        w = numpyro.sample("w", dist.LowRankMultivariateNormal(np.ones(3), factor, diag))
        numpyro.sample("y", dist.Normal(x.sum() + w.sum(), 1.0), obs=y)

    problem, draws = _prior_draws(model, y=0.0, seed=9)
    assert {s.name: s.shape for s in problem.latent_sites} == {"x": (2, 3), "w": (3,)}
    assert problem.latent_sites[0].dims == ("groups", "x_dim_1")
    x = np.asarray(draws["x"]).reshape(N, 6)
    np.testing.assert_allclose(np.cov(x.T), 2.0 * np.eye(6), atol=0.2)
    w = np.asarray(draws["w"])
    np.testing.assert_allclose(np.cov(w.T), factor @ factor.T + np.diag(diag), atol=0.12)
    assert np.all(np.abs(w.mean(0) - 1.0) < 4 * np.sqrt(np.diag(factor @ factor.T) + diag) / 60)


def test_gaussian_random_walk_prior():
    def model(y=None):
        x = numpyro.sample("x", dist.GaussianRandomWalk(0.5, num_steps=4))
        numpyro.sample("y", dist.Normal(x, 1.0), obs=y)

    _, draws = _prior_draws(model, y=np.zeros(4), seed=10)
    i = np.arange(1, 5)
    expected = 0.25 * np.minimum.outer(i, i)
    np.testing.assert_allclose(np.cov(np.asarray(draws["x"]).T), expected, atol=0.06)


def test_dirichlet_prior():
    alpha = np.array([0.02, 1.0, 4.0])  # a tiny concentration must not underflow

    def model(y=None):
        p = numpyro.sample("p", dist.Dirichlet(alpha))
        numpyro.sample("y", dist.Normal(p, 0.1), obs=y)

    problem, draws = _prior_draws(model, y=np.ones(3) / 3, seed=12)
    assert problem.dim == 3  # K whitened coordinates for K categories
    p = np.asarray(draws["p"])
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    for k in range(3):
        marginal = st.beta(alpha[k], alpha.sum() - alpha[k])
        assert _ks_pvalue(p[:, k], marginal.cdf) > KS_LEVEL


def test_stick_breaking_transform_takes_base_coordinates():
    from numpyro.distributions.transforms import StickBreakingTransform

    fn = dist.TransformedDistribution(dist.Normal(np.zeros(3), 1.0), StickBreakingTransform())
    assert whitened_shape(fn) == (3,) and fn.shape() == (4,)
    value = whitened_transform(fn, np.zeros(3))
    assert value.shape == (4,)
    np.testing.assert_allclose(value.sum(), 1.0)


@pytest.mark.parametrize(
    "fn",
    [
        dist.LKJ(3, 2.0),
        dist.Wishart(4.0, scale_matrix=np.eye(2)),
        dist.MultivariateStudentT(3.0, np.zeros(2), np.eye(2)),
        dist.VonMises(0.0, 1.0),
    ],
    ids=lambda f: type(f).__name__,
)
def test_unsupported_prior_raises_naming_site_and_families(fn):
    with pytest.raises(ModelTracingError) as err:
        whitened_shape(fn, "omega")
    message = str(err.value)
    assert "'omega'" in message and "Supported prior families" in message
    assert "Gamma" in message and "Dirichlet" in message
    assert err.value.site == "omega"


def test_float32_beta_quantile_stays_inside_the_unit_interval():
    """Beta(0.1, 1)'s float32 quantile rounds to 0 for u ≲ −4 (≈ 1.6e-4 of the prior);
    it is held at the smallest normal number, so log(x) in a model stays finite."""
    from eki_infer.tracing.priors import beta_quantile

    u = jnp.array([-8.0, -5.0, -4.0, 0.0, 8.0], dtype=jnp.float32)
    for a, b in ((0.1, 1.0), (1.0, 0.1)):
        x = beta_quantile(jnp.float32(a), jnp.float32(b), u)
        assert x.dtype == jnp.float32
        assert np.all(np.asarray(x) > 0.0) and np.all(np.asarray(x) < 1.0)
        assert np.all(np.isfinite(np.log(np.asarray(x)))) and np.all(np.diff(np.asarray(x)) >= 0)


# --------------------------------------------------------------------------------------
# float32 at large shape parameters: asymptotic expansions instead of the inversion

U_WIDE = np.linspace(-9.0, 9.0, 73)


@pytest.mark.parametrize("a", [300.0, 1e3, 1e5])
def test_gamma_expansion_matches_the_inversion_in_float64(a):
    """Temme's expansion truncates at O(a⁻³) in η: ~1e-7 prior sd at a = 300 (measured)."""
    from eki_infer.tracing.large_parameter_quantiles import gamma_quantile_large

    x = np.exp(np.asarray(gamma_log_quantile(a, U_WIDE)))
    np.testing.assert_allclose(gamma_quantile_large(a, U_WIDE), x, rtol=0, atol=5e-7 * a**0.5)


@pytest.mark.parametrize("a, b", [(1e3, 1e3), (1e3, 1e6), (1e5, 3e4)])
def test_beta_expansion_matches_the_inversion_in_float64(a, b):
    """Third-order Cornish–Fisher: its error grows like u⁵ / min(a, b)^1.5, 1.6e-5 sd at
    |u| = 9 for a = b = 1000 (measured)."""
    from eki_infer.tracing.large_parameter_quantiles import beta_logit_quantile_large

    t = np.asarray(beta_logit_quantile(a, b, U_WIDE))
    sd = np.sqrt(1.0 / a + 1.0 / b)  # of logit x, to leading order
    np.testing.assert_allclose(beta_logit_quantile_large(a, b, U_WIDE), t, atol=5e-5 * sd)


@pytest.mark.parametrize("df", [1e3, 1e6])
def test_studentt_expansion_matches_the_inversion_in_float64(df):
    from eki_infer.tracing.large_parameter_quantiles import studentt_quantile_large

    z = np.asarray(studentt_quantile(df, U_WIDE))
    np.testing.assert_allclose(studentt_quantile_large(df, U_WIDE), z, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    "prior",
    [
        dist.Gamma(1e6, 2.0),  # 0.69 prior sd off before the expansions
        dist.Gamma(300.0, 0.1),
        dist.Chi2(2e4),
        dist.Beta(1e5, 1e5),  # 0.21
        dist.Beta(1e3, 1e5),  # 0.07
        dist.Beta(1e5, 1.0),  # 0.08, from log B(a, b) (inversion, float32 betaln)
        dist.StudentT(1e6, 1.0, 3.0),  # 0.05
        dist.Dirichlet(jnp.array([1e4, 2e4, 5e3])),
    ],
    ids=lambda d: f"{type(d).__name__}",
)
def test_float32_quantiles_at_large_shapes_match_float64(prior):
    """The float32 transform agrees with the float64 one (itself pinned to the cdf above)
    to 1e-3 prior sd plus one float32 spacing of the value over |u| <= 6, where the float32
    inversion was up to 0.7 sd off. (Beta(1e5, 1) lives within 1e-5 of 1, where float32
    values are 6e-8 apart: 0.006 of its sd.)"""
    u = np.linspace(-6.0, 6.0, 49)
    shape = (len(u), *whitened_shape(prior))
    u_full = np.broadcast_to(u.reshape(-1, *[1] * (len(shape) - 1)), shape)

    def transform(dtype):
        d = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), prior)
        fn = jax.vmap(lambda v: whitened_transform(d, v))
        return fn(jnp.asarray(u_full, dtype))

    x32, x64 = transform(jnp.float32), transform(jnp.float64)
    assert x32.dtype == jnp.float32
    scale = np.asarray(prior.variance) ** 0.5
    spacing = np.spacing(np.abs(np.asarray(x32))).astype(float)
    error = (np.abs(np.asarray(x32, dtype=float) - np.asarray(x64)) - spacing) / scale
    assert error.max() < 1e-3, error.max()


def test_float32_half_normal_far_upper_tail_stays_finite():
    """Φ(−u) / 2 underflows float32 beyond u ≈ 12.9; the quantile there comes from Newton
    steps on log Φ, not ndtri(0) (which gave 3.4e38)."""
    u = np.array([5.0, 12.0, 12.9, 13.5, 20.0])
    x = whitened_transform(
        dist.HalfNormal(jnp.float32(2.0)).expand([5]), jnp.asarray(u, jnp.float32)
    )
    assert x.dtype == jnp.float32
    exact = -2.0 * sc.ndtri(np.exp(sc.log_ndtr(-u) - np.log(2.0)))
    np.testing.assert_allclose(np.asarray(x, dtype=float), exact, rtol=1e-6)

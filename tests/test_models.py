"""The reference models in ``models/``: data, sites, forward maps, exact posteriors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.util import log_density

from models import REFERENCE_MODELS, darcy, eight_schools, exp_sine, linear_gaussian, lorenz96, sir

# name -> (module, model function, {latent site: shape}, observed shape)
SPECS = {
    "exp_sine": (exp_sine, exp_sine.model, {"amplitude": (), "vertical_shift": ()}, (2,)),
    "linear_gaussian": (linear_gaussian, linear_gaussian.model, {"theta": (5,)}, (20,)),
    "lorenz96": (lorenz96, lorenz96.model, {"forcing": (), "damping": ()}, (16,)),
    "darcy": (darcy, darcy.model, {"kl_coefficients": (8,)}, (15,)),
    "sir": (sir, sir.model, {"beta": (), "gamma": (), "i0": ()}, (20,)),
    "eight_schools": (
        eight_schools,
        eight_schools.model,
        {"mu": (), "tau": (), "theta": (8,)},
        (8,),
    ),
    "eight_schools_noncentered": (
        eight_schools,
        eight_schools.model_noncentered,
        {"mu": (), "tau": (), "theta_tilde": (8,)},
        (8,),
    ),
}

_DATA_CACHE: dict = {}


def _data(module):
    """simulate_data at the defaults, computed once per module (lorenz96 is the slow one)."""
    if module.__name__ not in _DATA_CACHE:
        _DATA_CACHE[module.__name__] = module.simulate_data(jax.random.PRNGKey(0))
    return _DATA_CACHE[module.__name__]


def test_registry_lists_every_module():
    assert set(REFERENCE_MODELS) == {
        "exp_sine",
        "linear_gaussian",
        "lorenz96",
        "darcy",
        "sir",
        "eight_schools",
    }
    for name, module in REFERENCE_MODELS.items():
        assert module.__name__ == f"models.{name}"
        for attr in ("model", "simulate_data", "forward", "TRUE_PARAMS"):
            assert hasattr(module, attr), (name, attr)
        assert module.__doc__ and "Source" in module.__doc__
    assert hasattr(REFERENCE_MODELS["linear_gaussian"], "exact_posterior")
    with pytest.raises(KeyError):
        REFERENCE_MODELS["nope"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_simulate_data_is_finite_with_documented_shape(name):
    module, _, _, obs_shape = SPECS[name]
    args, y = _data(module)
    assert isinstance(args, tuple)
    assert y.shape == obs_shape
    assert np.all(np.isfinite(np.asarray(y)))
    for a in args:
        assert np.all(np.isfinite(np.asarray(a)))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sites_prior_predictive_and_conditioned(name):
    module, model, latents, obs_shape = SPECS[name]
    args, y = _data(module)

    # Prior predictive: y is sampled, not observed.
    tr = handlers.trace(handlers.seed(model, jax.random.PRNGKey(1))).get_trace(*args, y=None)
    samples = {k: s for k, s in tr.items() if s["type"] == "sample"}
    assert set(samples) == {*latents, "y"}
    for site, shape in latents.items():
        assert not samples[site]["is_observed"]
        assert jnp.shape(samples[site]["value"]) == shape, site
    assert not samples["y"]["is_observed"]
    assert samples["y"]["value"].shape == obs_shape
    assert np.all(np.isfinite(np.asarray(samples["y"]["value"])))

    # Conditioned: y observed, with a Gaussian likelihood whose noise is not a latent.
    tr = handlers.trace(handlers.seed(model, jax.random.PRNGKey(2))).get_trace(*args, y=y)
    site = tr["y"]
    assert site["is_observed"]
    np.testing.assert_array_equal(site["value"], y)
    fn = site["fn"]
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    assert isinstance(fn, dist.Normal | dist.MultivariateNormal)
    latent_names = [k for k, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]
    assert list(latent_names) == list(latents)  # model order

    # Finite log density at the truth (or at a prior draw for eight schools).
    params = module.TRUE_PARAMS if name != "eight_schools_noncentered" else None
    if params is None:
        params = {k: tr[k]["value"] for k in latents}
    params = {k: jnp.asarray(v) for k, v in params.items()}
    assert np.isfinite(float(log_density(model, args, {"y": y}, params)[0]))


# name -> (params -> forward(params, *args)) and a batch of parameter dicts
def _forward_fn(name, args):
    if name == "exp_sine":
        (t,) = args
        return lambda p: exp_sine.forward(p["amplitude"], p["vertical_shift"], t)
    if name == "linear_gaussian":
        X = args[0]
        return lambda p: linear_gaussian.forward(p["theta"], X)
    if name == "lorenz96":
        x0 = args[0]
        return lambda p: lorenz96.forward(p["forcing"], p["damping"], x0)
    if name == "darcy":
        basis, obs_idx = args[0], args[1]
        return lambda p: darcy.forward(p["kl_coefficients"], basis, obs_idx)
    if name == "sir":
        times = args[0]
        return lambda p: sir.forward(p["beta"], p["gamma"], p["i0"], times)
    if name == "eight_schools":
        return lambda p: eight_schools.forward(p["theta"])
    raise KeyError(name)


FORWARD_NAMES = ["exp_sine", "linear_gaussian", "lorenz96", "darcy", "sir", "eight_schools"]


def _prior_batch(name, n, dtype):
    module, model, latents, _ = SPECS[name]
    args, _ = _data(module)
    draws = Predictive(model, num_samples=n, return_sites=list(latents))(
        jax.random.PRNGKey(3), *args
    )
    return {k: v.astype(dtype) for k, v in draws.items()}


def _cast_args(args, dtype):
    out = []
    for a in args:
        a = jnp.asarray(a)
        out.append(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a)
    return tuple(out)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_map_jits_and_vmaps(name, dtype):
    module, _, _, obs_shape = SPECS[name]
    args, _ = _data(module)
    args = _cast_args(args, dtype)
    f = _forward_fn(name, args)
    batch = _prior_batch(name, 4, dtype)
    batched = jax.jit(jax.vmap(f))(batch)
    assert batched.shape == (4, *obs_shape)
    assert batched.dtype == dtype
    f_jit = jax.jit(f)
    single = [f_jit({k: v[i] for k, v in batch.items()}) for i in range(4)]
    rtol = 1e-10 if dtype == jnp.float64 else 1e-4
    if name == "lorenz96":  # chaotic: compilation differences grow, in float32 noticeably
        rtol = 1e-8 if dtype == jnp.float64 else 5e-2
    for i in range(4):
        assert np.all(np.isfinite(np.asarray(single[i])))
        np.testing.assert_allclose(batched[i], single[i], rtol=rtol, atol=rtol)


def test_forward_at_truth_matches_noise_scale_of_data():
    """simulate_data's y is G(truth) plus noise of the documented size."""
    (t,), y = _data(exp_sine)
    g = exp_sine.forward(1.0, 0.8, t)
    assert np.all(np.abs(np.asarray(y - g)) < 5 * np.sqrt(exp_sine.NOISE_VARIANCE))
    # EKP's grid: 0:0.01:(2π + 0.01), 630 points.
    assert t.shape == (630,) and float(t[-1]) == pytest.approx(6.29)
    args, y = _data(sir)
    g = sir.forward(**sir.TRUE_PARAMS, times=args[0])
    assert np.max(np.abs(np.asarray(y - g))) < 5 * sir.NOISE_SCALE
    assert float(jnp.max(g)) > 0.1  # the epidemic peaks inside the observation window


def _joint_conditioning(X, m0, S0, noise_scale, y):
    """Posterior by conditioning the joint Gaussian of (θ, y): the gain form."""
    X, m0, S0, y = (np.asarray(a, dtype=np.float64) for a in (X, m0, S0, y))
    gamma = np.diag(np.asarray(noise_scale, dtype=np.float64) ** 2)
    cross = S0 @ X.T
    gain = np.linalg.solve(X @ S0 @ X.T + gamma, cross.T).T
    return m0 + gain @ (y - X @ m0), S0 - gain @ cross.T


@pytest.mark.parametrize(("d", "M"), [(5, 20), (3, 2), (12, 40)])
def test_linear_gaussian_exact_posterior_matches_joint_conditioning(d, M):
    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(d), d=d, M=M)
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    ref_mean, ref_cov = _joint_conditioning(*args, y)
    assert mean.shape == (d,) and cov.shape == (d, d)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, cov.T, atol=1e-14)


def test_linear_gaussian_nonzero_prior_mean_and_heteroscedastic_noise():
    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(7))
    X, _, S0, _ = args
    m0 = jnp.linspace(-1.0, 1.0, 5)
    sigma = jnp.linspace(0.2, 1.0, 20)
    mean, cov = linear_gaussian.exact_posterior(X, m0, S0, sigma, y)
    ref_mean, ref_cov = _joint_conditioning(X, m0, S0, sigma, y)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-10)


def test_linear_gaussian_nuts_matches_exact_posterior():
    args, y = _data(linear_gaussian)
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    mcmc = MCMC(NUTS(linear_gaussian.model), num_warmup=200, num_samples=200, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), *args, y=y)
    theta = np.asarray(mcmc.get_samples()["theta"])
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(theta.mean(axis=0) - mean) < 0.25 * sd)


def test_exp_sine_quadrature_posterior_is_converged_and_sane():
    (t,), y = _data(exp_sine)
    mean, cov = exp_sine.exact_posterior(t, y)
    mean2, cov2 = exp_sine.exact_posterior(t, y, grid_size=1001)
    np.testing.assert_allclose(mean, mean2, atol=1e-8)
    np.testing.assert_allclose(cov, cov2, atol=1e-8)
    assert mean.shape == (2,) and cov.shape == (2, 2)
    np.testing.assert_allclose(cov, cov.T)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    # Near the truth (1.0, 0.8), within a few posterior standard deviations.
    assert np.all(np.abs(mean - np.array([1.0, 0.8])) < 3 * np.sqrt(np.diag(cov)))
    # The mirror mode at negative amplitude widens the full posterior's amplitude spread.
    mean_main, cov_main = exp_sine.exact_posterior(t, y, main_mode_only=True)
    assert mean_main[0] > mean[0] and cov_main[0, 0] < cov[0, 0]


def test_eight_schools_classic_and_simulated_data():
    (sigma,), y = _data(eight_schools)
    np.testing.assert_array_equal(y, [28, 8, -3, 7, -1, 1, 18, 12])
    np.testing.assert_array_equal(sigma, [15, 10, 16, 11, 9, 11, 10, 18])
    (sigma,), y_sim = eight_schools.simulate_data(jax.random.PRNGKey(0), classic=False)
    assert y_sim.shape == (8,) and not np.allclose(y_sim, y)
    # The non-centred model records theta as a deterministic site.
    tr = handlers.trace(handlers.seed(eight_schools.model_noncentered, 0)).get_trace(sigma)
    assert tr["theta"]["type"] == "deterministic"
    np.testing.assert_allclose(
        tr["theta"]["value"],
        tr["mu"]["value"] + tr["tau"]["value"] * tr["theta_tilde"]["value"],
    )


def test_lorenz96_noise_is_data_and_positive():
    (x0, noise_var), y = _data(lorenz96)
    assert x0.shape == (16, 8)
    assert noise_var.shape == (16,) and np.all(np.asarray(noise_var) > 0)
    # Truth fits the data at the noise level.
    g = lorenz96.forward(8.0, 1.0, x0)
    z = np.asarray((y - g) / jnp.sqrt(noise_var))
    assert np.all(np.abs(z) < 5)


def test_darcy_pressure_solver_against_closed_form():
    # Constant permeability k: p(x) = x (1 - x) / (2 k); FD is exact for a quadratic.
    num_cells = 64
    log_k = jnp.full((num_cells,), jnp.log(2.0))
    p = darcy.solve_pressure(log_k)
    x = jnp.arange(1, num_cells) / num_cells
    np.testing.assert_allclose(p, x * (1 - x) / 4.0, atol=1e-12)
    idx = darcy.observation_indices(64, 15)
    assert idx.shape == (15,) and idx.min() >= 0 and idx.max() < num_cells - 1


def test_models_condition_with_numpyro_condition_handler():
    """The models also work with y supplied through numpyro.handlers.condition."""
    args, y = _data(sir)
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(handlers.condition(sir.model, {"y": y})).get_trace(*args)
    assert tr["y"]["is_observed"]

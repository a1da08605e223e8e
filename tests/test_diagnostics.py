"""The Gaussian-approximation check: exact where q is the posterior, clear errors on an
ensemble without a density and on bad options, the run's executor, failed draws counted."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from _black_box_models import decay_numpy, make_model, observations

from eki_infer import EKIInference
from eki_infer.convert import group
from eki_infer.diagnostics import gaussian_approximation_check
from eki_infer.executors import ThreadExecutor

MATRIX = jnp.array([[1.0, 0.5, 0.1], [0.2, 1.0, 0.0], [0.3, -0.4, 1.0], [0.0, 0.7, -0.2]])
DATA = jnp.array([0.5, 1.0, -0.2, 0.3])


def linear_model(y=None):
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("y", dist.Normal(MATRIX @ theta, 0.3).to_event(1), obs=y)


def test_exact_gaussian_gets_uniform_weights():
    # UKI is exact for a linear-Gaussian problem: q is the posterior, so every weight is
    # 1/n up to rounding, the ESS is 1 and the weights move the draws' mean by nothing.
    with pytest.warns(UserWarning, match="UKI is deterministic.*R-hat across such chains is 1"):
        uki = EKIInference(linear_model, "uki", num_chains=2, progress_bar=False)
    uki.run(jax.random.PRNGKey(0), y=DATA)
    check = gaussian_approximation_check(uki, num_draws=500)
    np.testing.assert_allclose(check.ess_fraction, 1.0, atol=1e-9)
    np.testing.assert_allclose(check.max_weight, 1.0 / 500, rtol=1e-6)
    assert np.all(check.mean_shift < 1e-6) and np.all(check.value_shift < 1e-6)
    assert check.good and np.all(check.failed == 0)


def test_mean_shift_is_not_rounding_for_a_narrow_posterior():
    """Noise 1e-12: the posterior sd is ~1e-12 and its mean O(1). Taking E_w[u] − ū from
    the draws u themselves left rounding of |u| · ε / sd ≈ 2e-3 sd_q (float32 has it at
    noise 1e-3: 1.5 sd_q); from the deviations u − m it is 8e-5 (the weights' own)."""

    def narrow(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        numpyro.sample("y", dist.Normal(MATRIX @ theta, 1e-12).to_event(1), obs=y)

    uki = EKIInference(narrow, "uki", progress_bar=False)
    uki.run(jax.random.PRNGKey(0), y=MATRIX @ jnp.array([0.7, -0.4, 1.1]))
    check = gaussian_approximation_check(uki, num_draws=500)
    np.testing.assert_allclose(check.ess_fraction, 1.0, atol=1e-6)
    assert np.all(check.mean_shift < 5e-4), check.mean_shift


def test_ensemble_without_a_density_is_refused():
    eki = EKIInference(linear_model, "eki", ensemble_size=3, progress_bar=False)
    with pytest.warns(UserWarning, match="rank-deficient"):
        eki.run(jax.random.PRNGKey(0), y=DATA)
    with pytest.raises(ValueError, match=r"3 members for 3 parameters.*ensemble_size > 3"):
        gaussian_approximation_check(eki)


def test_bad_options_are_named():
    uki = EKIInference(linear_model, "uki", progress_bar=False)
    with pytest.raises(RuntimeError, match="run"):
        gaussian_approximation_check(uki)
    uki.run(jax.random.PRNGKey(0), y=DATA)
    with pytest.raises(ValueError, match="num_draws"):
        gaussian_approximation_check(uki, num_draws=1)
    with pytest.raises(ValueError, match="threshold"):
        gaussian_approximation_check(uki, threshold=0.0)
    with pytest.raises(ValueError, match="max_value_shift"):
        gaussian_approximation_check(uki, max_value_shift=0.0)


def test_smc_runs_are_refused():
    """A Gaussian fitted to SMC's draws says nothing about SMC (on eight schools it called
    an accurate run poor), so the check names the methods it is for."""
    smc = EKIInference(linear_model, "smc", ensemble_size=100, progress_bar=False)
    idata = smc.run(jax.random.PRNGKey(0), y=DATA)
    with pytest.raises(ValueError, match="for EKI, EKS and UKI runs, not method='smc'") as err:
        gaussian_approximation_check(smc)
    # it points at the group that holds SMC's diagnostics, which sample_stats does not
    assert "ensemble_history" in str(err.value)
    assert "ess" in group(idata, "ensemble_history")


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match=r"takes the EKIInference engine .* got dict"):
        gaussian_approximation_check({})
    engine = EKIInference(linear_model, "uki", progress_bar=False)
    with pytest.raises(RuntimeError, match="call run"):
        gaussian_approximation_check(engine)
    engine.run(jax.random.PRNGKey(0), y=DATA)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\], got None"):
        gaussian_approximation_check(engine, threshold=None)
    with pytest.raises(ValueError, match="max_value_shift must be a number > 0, got 'x'"):
        gaussian_approximation_check(engine, max_value_shift="x")
    check = gaussian_approximation_check(engine, num_draws=50, threshold=np.float32(0.3))
    assert check.threshold == pytest.approx(0.3)


class CountingExecutor(ThreadExecutor):
    def __init__(self, workers):
        super().__init__(workers)
        self.batches = 0

    def map(self, *args, **kwargs):
        self.batches += 1
        return super().map(*args, **kwargs)


FAIL = {"now": False}


def decay_that_can_fail(rate, scale):
    if FAIL["now"]:
        raise RuntimeError("simulator down")
    return decay_numpy(rate, scale)


def test_check_runs_through_the_executor_and_counts_failed_draws():
    executor = CountingExecutor(2)
    eki = EKIInference(
        make_model(decay_that_can_fail),
        "eki",
        ensemble_size=20,
        executor=executor,
        progress_bar=False,
    )
    eki.run(jax.random.PRNGKey(0), y=observations())
    executor.batches = 0
    check = gaussian_approximation_check(eki, num_draws=40)
    assert executor.batches == 1  # one batch of all draws, through the run's executor
    assert np.all(check.failed == 0) and np.all(check.ess_fraction > 0)

    FAIL["now"] = True
    try:
        with pytest.warns(UserWarning, match="failed for \\[40\\] of the 40 draws.*ESS is 0"):
            check = gaussian_approximation_check(eki, num_draws=40)
    finally:
        FAIL["now"] = False
    assert check.ess_fraction[0] == 0.0 and not check.good
    assert check.failed[0] == 40


def test_value_shift_is_not_float32_rounding():
    """Values of size 1000 with a posterior sd of 1e-3 and uniform weights (q is the
    posterior): summed directly in float32 the moments gave a shift of 0.66 sd; from
    deviations in float64 it is the weights' own, 0."""
    from types import SimpleNamespace

    from eki_infer.diagnostics import _value_shifts

    rng = np.random.default_rng(0)
    x = (1000.0 + 1e-3 * rng.standard_normal((1, 2000, 3))).astype(np.float32)
    problem = SimpleNamespace(latent_sites=[SimpleNamespace(name="theta", shape=(3,))])
    w = np.full((1, 2000), 1 / 2000, np.float32)
    shift, worst = _value_shifts(problem, {"theta": jnp.asarray(x)}, w, np.ones((1, 2000), bool))
    assert shift[0] < 1e-6 and worst[0].startswith("theta[")

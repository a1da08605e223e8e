"""Tempered SMC with Kalman-informed moves (eki_infer.smc) and the Gaussian check."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from eki_infer import EKIInference
from eki_infer.convert import group
from eki_infer.diagnostics import gaussian_approximation_check
from eki_infer.schedulers import DataMisfitController
from eki_infer.smc import (
    MoveStats,
    SMCError,
    chain_ess,
    choose_dt,
    default_num_particles,
    dmc_dt,
    ess_of_log_weights,
    pooled_log_evidence,
    predictive_noise_draws,
    run_smc,
)
from eki_infer.tracing import trace_model
from models import eight_schools, exp_sine, linear_gaussian

# Eight schools (classic data, centred model's posterior), reference from NumPyro NUTS on
# the non-centred model: 4 chains x 100 000 draws after 2 000 warmup,
# target_accept_prob=0.95, PRNGKey(2024), float64 (n_eff > 300 000 for mu and tau;
# r_hat 1.000). Values are (posterior mean, posterior sd).
EIGHT_SCHOOLS_NUTS = {
    "mu": (4.3998, 3.3137),
    "tau": (3.5958, 3.2061),
    "theta": (
        np.array([6.2199, 4.9447, 3.9343, 4.7568, 3.6132, 4.0409, 6.3079, 4.8498]),
        np.array([5.5984, 4.6679, 5.2442, 4.7737, 4.6489, 4.8242, 5.0967, 5.2957]),
    ),
}


@pytest.fixture(scope="module")
def linear():
    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0))
    return args, y, trace_model(linear_gaussian.model, *args, y=y)


def test_choose_dt_hits_the_ess_target():
    phi = jnp.linspace(0.0, 50.0, 400)
    log_w = jnp.full(400, -jnp.log(400.0))
    dt = choose_dt(log_w, phi, 0.0, 0.5)
    ess = ess_of_log_weights(log_w - dt * phi) / 400
    assert 0 < float(dt) < 1 and abs(float(ess) - 0.5) < 1e-6
    # a step that keeps the ESS above target is capped at 1 - t
    assert float(choose_dt(log_w, phi * 1e-6, 0.3, 0.5)) == pytest.approx(0.7)
    # failed particles (inf) are discounted, never give NaN
    dt = choose_dt(log_w, phi.at[:100].set(jnp.inf), 0.0, 0.5)
    assert np.isfinite(float(dt)) and float(dt) > 0


def _evidence_sd(history, num_particles):
    """Per-chain sd of log Z: with well-mixed stages, log Z is a sum of independent
    log-means of incremental weights, each with variance (1/ESS_k − 1)/N to first order
    (ESS_k: stage k's ESS fraction; N/ESS = mean(w²)/mean(w)²)."""
    return np.sqrt(np.sum(1.0 / history.ess - 1.0, axis=1) / num_particles)


def _check_linear_gaussian(args, y, problem, result, num_particles):
    theta = np.asarray(jax.jit(problem.prior_transform)(result.particles)["theta"])
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    sd = np.sqrt(np.diag(cov))
    pooled = theta.reshape(-1, theta.shape[-1])
    # 1200 particles, inefficiency ≤ 2 (waste-free: final ESS ≥ 0.8 N; resample-move:
    # decorrelated moves): Monte-Carlo sd of the mean ≤ sqrt(2 / 1200) = 0.041 posterior
    # sd, of the sd ratio ≤ sqrt(2 / 2400) = 0.029; 3.5 of them over the 5 coordinates
    assert np.max(np.abs(pooled.mean(0) - mean) / sd) < 0.14
    assert np.max(np.abs(pooled.std(0) / sd - 1)) < 0.1
    X, m0, S0, sigma = (np.asarray(a, dtype=np.float64) for a in args)
    exact = multivariate_normal(X @ m0, X @ S0 @ X.T + np.diag(sigma**2)).logpdf(np.asarray(y))
    # each chain within 4 sd of its log Z, the mean of the chains within 3 sd of the mean
    # (log Z's bias, −Var/2, is a fraction of one sd here)
    chain_sd = _evidence_sd(result.history, num_particles)
    assert np.all(np.abs(result.log_evidence - exact) < 4 * chain_sd), (
        result.log_evidence - exact,
        chain_sd,
    )
    mean_sd = np.sqrt(np.sum(chain_sd**2)) / len(chain_sd)
    assert abs(np.mean(result.log_evidence) - exact) < 3 * mean_sd


def test_linear_gaussian_posterior_and_evidence(linear):
    args, y, problem = linear
    result = run_smc(problem, jax.random.PRNGKey(1), 300, 4)
    _check_linear_gaussian(args, y, problem, result, 300)
    h = result.history
    assert np.all(h.t[:, -1] == 1.0) and np.all(np.diff(h.t, axis=1) >= 0)
    # the Kalman proposal is exact for linear-Gaussian targets: high acceptance (the last
    # row, the extension at t = 1, has none when the ESS target was met without moves)
    kalman = h.acceptance_kalman
    assert np.all((kalman > 0.7) | (np.isnan(kalman) & (h.moves == 0)))
    # waste-free, one chain: 300 prior draws, then 30 chains moved once per move; the
    # Kalman transport is probed on 30 particles and, when the probe's ESS passes, run on
    # the other 270
    alone = run_smc(problem, jax.random.PRNGKey(1), 300, 1).history
    probed = np.isfinite(alone.transport_probe_ess[0])
    full = probed & (alone.transport_probe_ess[0] >= 0.8)
    assert alone.forward_evaluations[0, -1] == (
        300 + 30 * alone.moves[0].sum() + 30 * probed.sum() + 270 * full.sum()
    )
    # linear-Gaussian: the transport takes every chain to t = 1 (most from the prior)
    assert h.transported.any(axis=1).all() and np.all(h.t[h.transported == 1] == 1.0)
    # and without it, the tempering stages get there too
    plain = run_smc(problem, jax.random.PRNGKey(1), 300, 4, transport=False)
    _check_linear_gaussian(args, y, problem, plain, 300)
    assert plain.history.t.shape[1] > 2 and not plain.history.transported.any()
    assert np.all(np.isnan(plain.history.transport_probe_ess))
    assert np.all(h.dt[:, -1] == 0) and np.all(h.sample_ess[:, -1] > 0)
    assert result.particles.shape == (4, 30 * (10 + h.moves[0, -1]), 5)


def test_dmc_step_matches_the_eki_controller():
    rng = np.random.default_rng(0)
    residuals = rng.normal(size=(50, 6)) * np.linspace(0.5, 3.0, 50)[:, None]
    misfit = 0.5 * np.sum(residuals**2, axis=1)
    ctrl = DataMisfitController()
    expected, _ = ctrl.next(ctrl.init(), jnp.asarray(residuals), jnp.ones(50, bool))
    phi_mean, phi_var = misfit.mean(), misfit.var(ddof=1)
    q = max(6 / (2 * phi_mean), np.sqrt(6 / (2 * phi_var)))
    assert float(dmc_dt(jnp.asarray(misfit), 0.0, 6)) == pytest.approx(q, rel=1e-10)
    assert float(expected) == pytest.approx(q, rel=1e-10)
    # capped at 1 − t; failed particles (inf) are left out of the mean and variance
    assert float(dmc_dt(jnp.asarray(misfit * 1e-6), 0.25, 6)) == pytest.approx(0.75)
    with_failed = jnp.asarray(np.concatenate([misfit, [np.inf, np.inf]]))
    assert float(dmc_dt(with_failed, 0.0, 6)) == pytest.approx(q, rel=1e-10)
    # all misfits equal: the weights are flat, take the rest of the way (never NaN)
    assert float(dmc_dt(jnp.full(10, 3.0), 0.4, 6)) == pytest.approx(0.6)
    assert float(dmc_dt(jnp.asarray(misfit), 1.0, 6)) == 0.0


def test_dmc_schedule_linear_gaussian(linear):
    args, y, problem = linear
    # without the transport, which would take the prior to t = 1 in one step here
    result = run_smc(problem, jax.random.PRNGKey(2), 300, 4, schedule="dmc", transport=False)
    _check_linear_gaussian(args, y, problem, result, 300)
    h = result.history
    assert np.all(h.t[:, -1] == 1.0)
    # every step is the controller's: Δt = min(q, 1 − t), so only the last one is capped
    # and the steps sum to 1
    assert np.allclose(np.sum(h.dt, axis=1), 1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_smc(problem, jax.random.PRNGKey(2), 50, 1, schedule="misfit")


def test_eight_schools_against_long_nuts():
    args, y = eight_schools.simulate_data(None)
    problem = trace_model(eight_schools.model, *args, y=y)
    result = run_smc(problem, jax.random.PRNGKey(3), 1000, 4)
    values = jax.jit(problem.prior_transform)(result.particles)
    for name, (ref_mean, ref_sd) in EIGHT_SCHOOLS_NUTS.items():
        x = np.asarray(values[name]).reshape((-1, *np.shape(ref_mean)))
        err = np.abs(x.mean(0) - ref_mean) / ref_sd
        ratio = x.std(0) / ref_sd
        assert np.all(err < 0.1), (name, err)
        assert np.all(np.abs(ratio - 1) < 0.1), (name, ratio)


def _run_script_that_finishes(script: str, **env):
    """Runs ``script`` in a fresh Python (CPU only, ``env`` added to the environment)
    from the repository root; it must exit 0 and print 'finished'."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished" in done.stdout


def test_moves_do_not_starve_the_cpu_thread_pool():
    """Regression: with chain-batched triangular solves inside the move, jaxlib 0.10's CPU
    backend deadlocked on this run (every time with OPENBLAS_NUM_THREADS=1 on 2 cores):
    two solves split over the intra-op pool waited on each other's pieces."""
    script = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "from eki_infer.tracing import trace_model\n"
        "from eki_infer.smc import run_smc\n"
        "from models import eight_schools\n"
        "args, y = eight_schools.simulate_data(None)\n"
        "problem = trace_model(eight_schools.model, *args, y=y)\n"
        # resample-move: every move batches all 4 x 1000 particles, the original trigger
        "run_smc(problem, jax.random.PRNGKey(3), 1000, 4, waste_free=False)\n"
        "run_smc(problem, jax.random.PRNGKey(3), 1000, 4)\n"
        "print('finished')\n"
    )
    _run_script_that_finishes(script, OPENBLAS_NUM_THREADS="1")


def test_float32_factorisations_of_a_resampled_population_stay_finite():
    """A resampled float32 population has few distinct points; its covariance plus a
    1e-6 ridge is indefinite after rounding (for this one: a NaN Cholesky factor). The
    regularisation's floor at rounding level, and its retry, keep the factor finite."""
    from eki_infer.kalman_transport import regularised_cholesky

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((5, 30)) * np.logspace(0, 3, 30)
    u = jnp.asarray(distinct[rng.integers(0, 5, 100)], dtype=jnp.float32)
    du = u - u.mean(0)
    cov = du.T @ du / 100
    reg, chol = regularised_cholesky(cov, 1e-6)
    assert chol.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(chol)))
    np.testing.assert_allclose(chol @ chol.T, reg, rtol=1e-3, atol=1e-4 * float(reg.max()))
    # the ridge is small beside the covariance's own scale
    assert float(jnp.trace(reg - cov)) < 1e-2 * float(jnp.trace(cov))


def test_float32_smc_with_few_particles_runs():
    """Regression: in float32 (JAX's default) SMC with 100 particles in 30 dimensions
    stopped at its second stage with 'every one of the proposals failed': the proposal
    covariance's Cholesky factor was NaN, not the forward map. It now runs (warning that
    the population is small for d)."""
    script = (
        "import warnings, jax, jax.numpy as jnp, numpy as np\n"
        "import numpyro, numpyro.distributions as dist\n"
        "from eki_infer import EKIInference\n"
        "def model(y=None):\n"
        "    a = numpyro.sample('a', dist.Normal(0, 1).expand([30]))\n"
        "    numpyro.sample('y', dist.Normal(a, 1.0), obs=y)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    engine = EKIInference(model, method='smc', ensemble_size=100, num_samples=100,\n"
        "                          progress_bar=False)\n"
        "    result = engine.run(jax.random.PRNGKey(0), y=jnp.ones(30))\n"
        "a = np.asarray(result.posterior['a'])\n"
        "assert a.dtype == np.float32 and np.all(np.isfinite(a)), a.dtype\n"
        "assert any('effective sample size fell' in str(w.message) for w in caught)\n"
        "print('finished')\n"
    )
    _run_script_that_finishes(script, JAX_ENABLE_X64="0")


def test_exp_sine_against_quadrature():
    args, y = exp_sine.simulate_data(jax.random.PRNGKey(0))
    problem = trace_model(exp_sine.model, *args, y=y)
    result = run_smc(problem, jax.random.PRNGKey(1), 1000, 2)
    v = jax.jit(problem.prior_transform)(result.particles)
    draws = np.stack([np.asarray(v["amplitude"]), np.asarray(v["vertical_shift"])], -1)
    # SMC keeps the main mode (amplitude > 0); the mirror mode's weight (0.9 % of the mass
    # for these data) is fixed by the particles there when the modes separate and ranges
    # over 0-4 % with the seed (benchmarks/results/smc_schedule_study.md), so compare with
    # the main mode and only check that the mirror mode stays small.
    main = draws[draws[..., 0] > 0]
    mean, cov = exp_sine.exact_posterior(*args, y, main_mode_only=True)
    sd = np.sqrt(np.diag(cov))
    assert np.max(np.abs(main.mean(0) - mean) / sd) < 0.1
    assert np.max(np.abs(main.std(0) / sd - 1)) < 0.1
    assert np.mean(draws[..., 0] < 0) < 0.03
    # far from Gaussian: the Kalman transport is probed but never taken
    h = result.history
    assert not h.transported.any() and np.nanmax(h.transport_probe_ess) < 0.8
    assert np.isfinite(h.transport_probe_ess).sum() >= 4


def test_moves_leave_a_bimodal_tempered_target_invariant():
    """Exact draws of exp_sine's π_t at t = 0.3 (main mode and a 2 % mirror mode at
    amplitude < 0, by quadrature on a grid in whitened space) stay exact under 20 moves of
    the SMC kernel (Kalman, random-walk and independence proposals, adapted as in a
    stage; the last with a t component on each mode): each mode's share and moments are
    kept within their Monte-Carlo error. So SMC's loss of that mirror mode
    (benchmarks/results/smc_mirror_mode.md) is not a bias of the kernel: it comes from a
    population that is not made of exact draws (few chains on the mirror side, slow to
    follow its mass, then reweighted). A missing Hastings correction in the Kalman
    proposal fails this test."""
    from eki_infer.smc import _misfit, init, move, move_stats

    args, y = exp_sine.simulate_data(jax.random.PRNGKey(1))
    problem = trace_model(exp_sine.model, *args, y=y)
    forward, noise, t = jax.jit(problem.forward), problem.noise, 0.3
    g = np.linspace(-7.0, 7.0, 701)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    phi = np.asarray(_misfit(forward(jnp.asarray(grid)), y, noise))
    log_w = -0.5 * np.sum(grid**2, -1) - t * phi
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    mirror = np.asarray(jax.jit(problem.prior_transform)(jnp.asarray(grid))["amplitude"]) < 0
    exact_share = w[mirror].sum()
    assert 0.01 < exact_share < 0.04

    def mode_moments(u, mask, weights=None):
        return np.average(u[mask], 0, weights), np.sqrt(
            np.average((u[mask] - np.average(u[mask], 0, weights)) ** 2, 0, weights)
        )

    exact = {
        side: mode_moments(grid, m, w[m]) for side, m in (("main", ~mirror), ("mirror", mirror))
    }
    n = 4000
    rng = np.random.default_rng(0)
    h = g[1] - g[0]
    u = grid[rng.choice(w.size, n, p=w)] + rng.uniform(-h / 2, h / 2, (n, 2))
    state = init(jax.random.PRNGKey(0), n, 2, forward, y, noise)
    out = forward(jnp.asarray(u))
    state = state._replace(
        particles=jnp.asarray(u), outputs=out, misfit=_misfit(out, y, noise), t=jnp.asarray(t)
    )
    stats = move_stats(state, y, noise)
    # the independence proposal has a t component on each mode (the split may leave a
    # few of the mirror's particles, its tail towards the main mode, in the other group)
    amplitude = np.asarray(jax.jit(problem.prior_transform)(state.particles)["amplitude"])
    second = np.exp(np.asarray(stats.mix_log_weight))[1]
    assert abs(second - np.mean(amplitude < 0)) < 0.005
    step = jax.jit(lambda k, s: move(k, s, stats, forward, y, noise))
    for m in range(20):
        state, (acc_rw, acc_kal, acc_ind, _, _) = step(jax.random.PRNGKey(100 + m), state)
    assert float(acc_rw) > 0.1 and float(acc_kal) > 0.1 and float(acc_ind) > 0.1
    moved = np.asarray(state.particles)
    on_mirror = np.asarray(jax.jit(problem.prior_transform)(state.particles)["amplitude"]) < 0
    share = on_mirror.mean()
    assert abs(share - exact_share) < 4 * np.sqrt(exact_share * (1 - exact_share) / n)
    for side, mask in (("main", ~on_mirror), ("mirror", on_mirror)):
        mean, sd = mode_moments(moved, mask)
        ex_mean, ex_sd = exact[side]
        # the kernel is fixed during the moves and moves each particle on its own, so
        # every particle is still an exact draw: 4 Monte-Carlo sds of the mode's count of
        # independent draws (the sd's error is smaller), ×1.5 for the grid cells' jitter
        tol = 1.5 * 4 / np.sqrt(mask.sum())
        assert np.all(np.abs(mean - ex_mean) / ex_sd < tol), (side, mean, ex_mean, ex_sd)
        assert np.all(np.abs(sd / ex_sd - 1) < tol), (side, sd, ex_sd)


def test_failures_get_zero_weight_and_clear_error():
    _, y, problem = _linear_problem()

    # a forward map that fails (NaN) for every particle: the error names the stage
    bad = dataclasses.replace(problem)
    object.__setattr__(bad, "forward", lambda u: jnp.full((*u.shape[:-1], y.shape[0]), jnp.nan))
    with pytest.raises(SMCError, match="stage 0"):
        run_smc(bad, jax.random.PRNGKey(0), 50, 1)
    # half the prior fails (u_0 > 0): the run still reaches t = 1 on the other half's
    # region, i.e. the posterior restricted to u_0 < 0
    half = dataclasses.replace(problem)
    good_forward = problem.forward
    object.__setattr__(
        half,
        "forward",
        lambda u: jnp.where(u[..., :1] > 0, jnp.nan, good_forward(u)),
    )
    result = run_smc(half, jax.random.PRNGKey(0), 200, 1)
    assert np.all(result.particles[..., 0] <= 0)
    assert result.history.t[0, -1] == 1.0
    # the prior draws that failed are counted, in the first stage, besides its moves'
    prior_failed = int(np.sum(result.initial_particles[0, :, 0] > 0))
    assert prior_failed > 50
    assert result.history.num_failed[0, 0] >= prior_failed
    # most of the prior fails (u_0 > -0.5: 69 %): a warning says so
    most = dataclasses.replace(problem)
    object.__setattr__(
        most, "forward", lambda u: jnp.where(u[..., :1] > -0.5, jnp.nan, good_forward(u))
    )
    with pytest.warns(UserWarning, match="failed .* of the 200 prior draws"):
        run_smc(most, jax.random.PRNGKey(0), 200, 1)


def test_a_minority_of_failed_forward_runs_warns_through_the_engine():
    """EKI and EKS warn for any failed member; SMC, which gives a failed point zero
    density, warns too, naming the count, since its posterior is then restricted to
    where the forward map works. A run without failures does not."""
    import warnings

    import numpyro
    import numpyro.distributions as dist

    def model(fail_above, y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        g = jnp.where(theta > fail_above, jnp.nan, theta) * jnp.ones(3)
        numpyro.sample("y", dist.Normal(g, 0.5), obs=y)

    y = jnp.array([0.1, -0.2, 0.3])
    engine = EKIInference(model, "smc", ensemble_size=200, progress_bar=False)
    with pytest.warns(UserWarning, match=r"SMC: the forward map failed .* of the run's \d+"):
        engine.run(jax.random.PRNGKey(0), 1.5, y=y)  # P(theta > 1.5) = 6.7 % of the prior
    assert engine.history.num_failed.sum() > 0
    assert np.all(group(engine.inference_data, "posterior")["theta"].values <= 1.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SMC: the forward map failed")
        engine.run(jax.random.PRNGKey(0), 50.0, y=y)
    assert engine.history.num_failed.sum() == 0


def _linear_problem():
    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0))
    return args, y, trace_model(linear_gaussian.model, *args, y=y)


def test_gaussian_check_flags_eight_schools_not_linear():
    args, y = eight_schools.simulate_data(None)
    eki = EKIInference(eight_schools.model, "eki", ensemble_size=200, progress_bar=False)
    eki.run(jax.random.PRNGKey(0), *args, y=y)
    poor = gaussian_approximation_check(eki)
    # EKI's tau is several posterior sds off here; the check's ESS collapses
    assert not poor.good and poor.ess_fraction[0] < 0.2 and poor.value_shift[0] > 10

    # UKI's Gaussian is fine by the ESS (0.31) but its parameters are several posterior
    # sds off: the weighted parameter moments expose it (value_shift in the thousands)
    uki = EKIInference(eight_schools.model, "uki", progress_bar=False)
    uki.run(jax.random.PRNGKey(0), *args, y=y)
    wide = gaussian_approximation_check(uki)
    assert wide.ess_fraction[0] > wide.threshold and wide.value_shift[0] > 10
    assert not wide.good

    # linear-Gaussian: value_shift estimates the run's real worst error (mean or sd, in
    # posterior sds), here EKI's Monte-Carlo error: 0.28 sd with 200 members (poor at
    # the default 0.25), 0.04 with 1000 (good)
    args, y, _ = _linear_problem()
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    sd = np.sqrt(np.diag(cov))
    for size in (200, 1000):
        eki = EKIInference(linear_gaussian.model, "eki", ensemble_size=size, progress_bar=False)
        theta = np.asarray(eki.run(jax.random.PRNGKey(0), *args, y=y).posterior["theta"])
        theta = theta.reshape(-1, sd.size)
        error = np.maximum(np.abs(theta.mean(0) - mean) / sd, np.abs(theta.std(0) / sd - 1))
        check = gaussian_approximation_check(eki)
        assert abs(check.value_shift[0] - error.max()) < 0.02, (check, error)
        assert check.worst_value[0] == f"theta[{np.argmax(error)}]"
        assert check.ess_fraction[0] > 0.5
        assert check.good == (size == 1000)


def test_engine_smc_end_to_end():
    args, y, _ = _linear_problem()
    engine = EKIInference(
        linear_gaussian.model, "smc", ensemble_size=200, num_chains=2, progress_bar=False
    )
    idata = engine.run(jax.random.PRNGKey(0), *args, y=y)
    for name in (
        "posterior",
        "prior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
        "ensemble_history",
    ):
        assert group(idata, name) is not None
    post = group(idata, "posterior")
    # waste-free: 20 chains of 10 states per SMC run, extended at t = 1 to the ESS target
    extra = int(engine.history.moves[0, -1])
    draws = 20 * (10 + extra)
    assert post["theta"].shape == (2, draws, 5)
    hist = group(idata, "ensemble_history")
    fields = ("t", "dt", "ess", "moves", "acceptance_rw", "acceptance_kalman", "sample_ess")
    extra_fields = ("acceptance_independent", "p_independent", "misfit_sd")
    for field in (*fields, "transport_probe_ess", "transported", *extra_fields):
        assert field in hist
    assert float(hist["t"][0, -1]) == 1.0
    assert engine.log_evidence.shape == (2,)
    assert engine.get_samples()["theta"].shape == (2 * draws, 5)
    # every batch runs both chains: the runs made are at least the chains' own counts
    attrs = dict(getattr(idata, "attrs", {})) or dict(group(idata, "posterior").attrs)
    assert attrs["forward_runs"] >= attrs["forward_evaluations"]
    assert attrs["forward_runs"] % 2 == 0
    # the chains' evidences pooled as log mean Ẑ, not as the mean of the logs
    per_chain = np.asarray(attrs["log_evidence_per_chain"])
    expected = np.log(np.mean(np.exp(per_chain - per_chain.max()))) + per_chain.max()
    np.testing.assert_allclose(attrs["log_evidence"], expected, rtol=1e-12)
    # chain 0 alone: the same states and the same predictive noise for each of its 20
    # Markov chains' first states (the 2-chain run's extension may be longer)
    alone = EKIInference(linear_gaussian.model, "smc", ensemble_size=200, progress_bar=False)
    alone_idata = alone.run(jax.random.PRNGKey(0), *args, y=y)
    for name, site in (("posterior", "theta"), ("posterior_predictive", "y")):
        first = np.asarray(group(alone_idata, name)[site])[0]
        second = np.asarray(group(idata, name)[site])[0]
        first, second = (a.reshape(20, -1, a.shape[-1]) for a in (first, second))
        n = min(first.shape[1], second.shape[1])
        np.testing.assert_allclose(first[:, :n], second[:, :n], rtol=1e-8, err_msg=name)


def test_checkpoint_resume_is_bit_identical(linear, tmp_path, monkeypatch):
    """A run interrupted after its first stage's checkpoint and resumed ends exactly where
    an uninterrupted run does (particles, evidence, history)."""
    from eki_infer.checkpoint import Checkpoint

    args, y, _ = linear
    options = {"ensemble_size": 200, "num_chains": 2, "progress_bar": False}
    full = EKIInference(linear_gaussian.model, "smc", **options)
    full.run(jax.random.PRNGKey(4), *args, y=y)

    saves = {"n": 0}
    original = Checkpoint.save_progress

    def crash_after_first(self, group, loop_state):
        original(self, group, loop_state)
        saves["n"] += 1
        if saves["n"] == 1:
            raise KeyboardInterrupt

    path = tmp_path / "smc.ckpt"
    monkeypatch.setattr(Checkpoint, "save_progress", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        EKIInference(linear_gaussian.model, "smc", **options).run(
            jax.random.PRNGKey(4), *args, y=y, checkpoint=path
        )
    resumed_saves = []

    def count(self, group, loop_state):
        resumed_saves.append(loop_state["stage"])
        original(self, group, loop_state)

    monkeypatch.setattr(Checkpoint, "save_progress", count)
    # defaults written out are the same run as defaults left out: the checkpoint resumes
    written_out = {"transport": True, "ess_target": 0.3, "chain_length": 10}
    resumed = EKIInference(linear_gaussian.model, "smc", smc_options=written_out, **options)
    resumed.resume(jax.random.PRNGKey(4), *args, y=y, checkpoint=path)
    stages = full.history.t.shape[1]
    # the interruption falls after chain 0's transport to t = 1 and in chain 1's tempering
    assert full.history.transported[0, 0] == 1 and full.history.t[1, 0] < 1
    assert stages >= 2 and resumed_saves == list(range(2, stages + 1))
    np.testing.assert_array_equal(
        np.asarray(resumed.get_samples()["theta"]), np.asarray(full.get_samples()["theta"])
    )
    np.testing.assert_array_equal(resumed.log_evidence, full.log_evidence)
    fields = ("t", "dt", "ess", "moves", "forward_evaluations", "transported")
    for name in (*fields, "transport_probe_ess"):
        np.testing.assert_array_equal(getattr(resumed.history, name), getattr(full.history, name))


def test_second_run_on_new_data_reuses_the_compiled_steps(linear):
    """Array model arguments (the observations included) are jit arguments: a run on new
    data reuses the compiled stage and move functions (no retrace) and gives what a
    fresh compilation gives."""
    import eki_infer.smc as smc_module

    args, y, problem = linear
    smc_module._COMPILED.clear()
    run_smc(problem, jax.random.PRNGKey(5), 100, 2)
    (steps,) = smc_module._COMPILED.values()
    new_problem = trace_model(linear_gaussian.model, *args, y=y + 0.3)
    cached = run_smc(new_problem, jax.random.PRNGKey(6), 100, 2)
    assert list(smc_module._COMPILED.values()) == [steps]
    assert all(step._cache_size() == 1 for step in steps)
    smc_module._COMPILED.clear()
    fresh = run_smc(new_problem, jax.random.PRNGKey(6), 100, 2)
    np.testing.assert_array_equal(cached.particles, fresh.particles)
    np.testing.assert_array_equal(cached.log_evidence, fresh.log_evidence)


def test_chain_ess_of_independent_and_of_frozen_chains():
    """M chains of P states: independent draws count as M·P, chains that never move as M
    (the estimate takes the smallest over coordinates and squares, so it errs low)."""
    rng = np.random.default_rng(0)
    m, p, d = 100, 10, 3
    stats = MoveStats(
        mean=jnp.zeros((1, d)),
        cov=jnp.eye(d)[None],
        chol=jnp.eye(d)[None],
        chol_inv=jnp.eye(d)[None],
        cross=jnp.zeros((1, d, 1)),
        start=jnp.zeros((1, m, d)),
        mix_mean=jnp.zeros((1, 2, d)),
        mix_chol=jnp.tile(jnp.eye(d), (1, 2, 1, 1)),
        mix_chol_inv=jnp.tile(jnp.eye(d), (1, 2, 1, 1)),
        mix_log_weight=jnp.array([[0.0, -jnp.inf]]),
    )
    independent = rng.normal(size=(1, m * p, d))
    ess = chain_ess(independent, m, stats)[0]
    # Var(chain means) from 100 chains has a relative sd of sqrt(2/99) = 0.14; the
    # smallest of 6 such ratios stays above 1 - 3 · 0.14
    assert 0.55 * m * p < ess <= m * p
    frozen = np.tile(rng.normal(size=(1, 1, m, d)), (1, p, 1, 1)).reshape(1, m * p, d)
    assert 0.55 * m < chain_ess(frozen, m, stats)[0] <= 1.01 * m


def test_resample_move_variant_and_bad_chain_length(linear):
    args, y, problem = linear
    result = run_smc(problem, jax.random.PRNGKey(5), 300, 4, waste_free=False)
    _check_linear_gaussian(args, y, problem, result, 300)
    h = result.history
    assert result.particles.shape == (4, 300, 5)
    assert result.forward_evaluations[0] == 300 * (1 + h.moves[0].sum())
    with pytest.raises(ValueError, match="multiple of chain_length"):
        run_smc(problem, jax.random.PRNGKey(5), 305, 1)
    # the engine says so when it is built, naming its own option
    with pytest.raises(ValueError, match=r"ensemble_size \(205\) must be a multiple"):
        EKIInference(linear_gaussian.model, "smc", ensemble_size=205)
    EKIInference(linear_gaussian.model, "smc", ensemble_size=205, smc_options={"waste_free": False})


def test_chain_zero_does_not_depend_on_the_number_of_chains(linear):
    """Chain c draws only from fold_in(key, c): chain 0's run is the same alone or beside
    others, up to the final extension's length, which runs until every chain is done."""
    _, _, problem = linear
    alone = run_smc(problem, jax.random.PRNGKey(6), 200, 1)
    beside = run_smc(problem, jax.random.PRNGKey(6), 200, 3)
    # draws are ordered chain by chain: (M Markov chains) × (their states in order)
    m = 200 // 10
    first = alone.particles[0].reshape(m, -1, 5)
    second = beside.particles[0].reshape(m, -1, 5)
    n = min(first.shape[1], second.shape[1])
    np.testing.assert_allclose(first[:, :n], second[:, :n], rtol=1e-8)
    np.testing.assert_allclose(alone.log_evidence[0], beside.log_evidence[0], rtol=1e-10)
    # one chain runs the forward map only for itself; beside others, its batches carry
    # theirs too (also once it is done)
    assert alone.forward_runs == alone.forward_evaluations[0]
    assert beside.forward_runs >= beside.forward_evaluations.sum()
    assert beside.particles.shape[1] >= alone.particles.shape[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smc_options": {"chain_length": 0}}, r"smc_options: chain_length must be a positive"),
        ({"smc_options": {"chain_length": True}}, r"chain_length must be a positive integer"),
        ({"smc_options": {"max_final_moves": True}}, r"max_final_moves must be an integer >= 0"),
        ({"smc_options": {"max_moves": 2**20}}, r"max_moves must be at most 1048575"),
        ({"smc_options": {"ess_targt": 0.5}}, r"smc_options: unknown SMC options \['ess_targt'\]"),
        ({"smc_options": {"max_stages": 3}}, r"smc_options\['max_stages'\] .* max_iterations"),
        ({"smc_options": {"final_ess": 0.8}}, r"final_ess is a number of draws"),
        ({"smc_options": {"jitter": -1.0}}, r"smc_options: jitter must be a finite positive"),
        ({"smc_options": {"ess_target": "0.5"}}, r"smc_options: ess_target must be a finite"),
        ({"smc_options": {"rw_acceptance": 5.0}}, r"rw_acceptance must be in \(0, 1\)"),
        ({"smc_options": {"p_kalman": 0.9, "p_independent": 0.9}}, r"must not exceed 1"),
        # options that the chosen variant would not read
        (
            {"smc_options": {"waste_free": False, "chain_length": 7}},
            r"chain_length applies only with waste_free=True",
        ),
        (
            {"smc_options": {"waste_free": False, "transport_ess": 0.5}},
            r"transport_ess applies only with waste_free=True",
        ),
        ({"smc_options": {"max_moves": 5}}, r"max_moves applies only with waste_free=False"),
        (
            {"smc_options": {"schedule": "dmc", "ess_target": 0.5}},
            r"ess_target applies only with schedule='ess'",
        ),
        # ... also at their default values: an engine's smc_options are all explicit
        (
            {"smc_options": {"waste_free": False, "chain_length": 10}},
            r"chain_length applies only with waste_free=True",
        ),
        (
            {"smc_options": {"schedule": "dmc", "ess_target": 0.3}},
            r"ess_target applies only with schedule='ess'",
        ),
        (
            {"smc_options": {"transport": False, "transport_ess": 0.8}},
            r"transport_ess applies only with transport=True",
        ),
        # the engine's own arguments
        (
            {"smc_options": {"num_particles": 100}},
            r"smc_options\['num_particles'\] .* ensemble_size",
        ),
        ({"smc_options": {"num_chains": 2}}, r"smc_options\['num_chains'\] .* num_chains"),
        ({"scheduler": DataMisfitController()}, r"scheduler does not apply to method='smc'"),
        ({"keep_path": True}, r"keep_path does not apply to method='smc'"),
    ],
)
def test_smc_options_are_checked_when_the_engine_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EKIInference(linear_gaussian.model, "smc", ensemble_size=200, **kwargs)


def test_smc_options_must_be_a_mapping():
    with pytest.raises(TypeError, match=r"smc_options must be a dict .* got str"):
        EKIInference(linear_gaussian.model, "smc", smc_options="dmc")


def test_a_bad_particle_count_blames_the_engine_option_not_smc_options():
    with pytest.raises(ValueError, match=r"^method='smc': .*ensemble_size \(2\)"):
        EKIInference(linear_gaussian.model, "smc", ensemble_size=2)
    with pytest.raises(ValueError, match=r"^smc_options: .*chain_length \(7\)"):
        EKIInference(
            linear_gaussian.model, "smc", ensemble_size=20, smc_options={"chain_length": 7}
        )


@pytest.mark.parametrize("flag", ["waste_free", "transport"])
def test_smc_flags_must_be_bools(flag):
    """A string such as "False" would be true: refused, not taken for the opposite."""
    with pytest.raises(TypeError, match=f"smc_options: {flag} must be True or False"):
        EKIInference(linear_gaussian.model, "smc", smc_options={flag: "False"})


def test_moves_that_all_fail_raise_with_the_simulator_error():
    """A simulator that works for the prior draws and then fails on every call: every
    move of the first stage fails, and the run stops there naming the stage and the
    simulator's own error instead of returning the frozen prior draws."""
    from eki_infer.simulators import black_box

    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0))
    design = np.asarray(args[0])
    calls = {"n": 0, "limit": 200}

    def simulator(theta):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise RuntimeError("cluster node lost")
        return design @ theta

    forward = black_box(simulator, output_shape=(design.shape[0],))

    def model(y=None):
        import numpyro
        import numpyro.distributions as dist

        theta = numpyro.sample("theta", dist.MultivariateNormal(args[1], args[2]))
        numpyro.sample("y", dist.Normal(forward(theta), args[3]).to_event(1), obs=y)

    engine = EKIInference(
        model, "smc", ensemble_size=200, progress_bar=False, smc_options={"transport": False}
    )
    with pytest.raises(SMCError, match=r"stage 1 \(moves\).*cluster node lost"):
        engine.run(jax.random.PRNGKey(3), y=y)
    assert engine.history is not None and engine.history.t.shape[1] == 0
    # failing later: the stages recorded before the failure stay, for diagnosis (tracing
    # 4 calls, prior 200, a stage's 9 moves of 20 chains 180)
    calls["n"], calls["limit"] = 0, 4 + 200 + 2 * 180 + 30
    with (
        pytest.raises(SMCError, match="cluster node lost"),
        pytest.warns(UserWarning, match="proposals failed"),
    ):
        engine.run(jax.random.PRNGKey(3), y=y)
    assert engine.history.t.shape[1] >= 2 and engine.inference_data is None


def test_a_checkpoint_of_other_data_is_refused(linear, tmp_path):
    """The data are part of a checkpoint's fingerprint: resuming with other observations
    raises instead of returning the old run's posterior."""
    from eki_infer.checkpoint import CheckpointMismatchError

    args, y, _ = linear
    path = tmp_path / "smc.ckpt"
    engine = EKIInference(linear_gaussian.model, "smc", ensemble_size=100, progress_bar=False)
    engine.run(jax.random.PRNGKey(0), *args, y=y, checkpoint=path)
    other = EKIInference(linear_gaussian.model, "smc", ensemble_size=100, progress_bar=False)
    with pytest.raises(CheckpointMismatchError, match=r"\(it differs in its data\)"):
        other.resume(jax.random.PRNGKey(0), *args, y=y + 3.0, checkpoint=path)


def test_default_particle_count_grows_with_the_dimension():
    assert default_num_particles(5) == 1000 and default_num_particles(10) == 1000
    assert default_num_particles(30) == 3000
    assert default_num_particles(30, chain_length=7) == 3003  # a multiple of it


def test_a_very_narrow_posterior_is_sampled():
    """Posterior sd 1e-12 in whitened space (G(θ) = [1e12 θ, θ], prior misfits ~1e23): the
    proposals' covariance regularisation is relative, so the moves are not frozen by an
    absolute floor (an absolute 1e-10 gave sd 1.6e-14 and a log evidence 30 too low)."""
    scale = 1e12

    def model(y=None):
        import numpyro
        import numpyro.distributions as dist

        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(jnp.stack([scale * theta, theta]), 1.0).to_event(1), obs=y)

    y = jnp.array([0.5 * scale, 0.5])
    problem = trace_model(model, y=y)
    result = run_smc(problem, jax.random.PRNGKey(0), 500, 1)
    theta = np.asarray(jax.jit(problem.prior_transform)(jnp.asarray(result.particles))["theta"])
    a = np.array([scale, 1.0])
    sd = 1.0 / np.sqrt(1.0 + a @ a)
    cov = np.outer(a, a) + np.eye(2)
    log_z = -0.5 * np.asarray(y) @ np.linalg.solve(cov, np.asarray(y))
    log_z -= 0.5 * np.linalg.slogdet(cov)[1] + np.log(2 * np.pi)
    assert abs(theta.std() / sd - 1) < 0.15
    assert abs(theta.mean() - 0.5) < 0.2 * sd
    assert abs(result.log_evidence[0] - log_z) < 0.5


def test_warnings_name_the_callers_line(linear):
    """Warnings raised deep in the package point at the user's call (here: this file)."""
    args, y, problem = linear
    with pytest.warns(UserWarning, match="max_stages=1") as record:
        run_smc(problem, jax.random.PRNGKey(0), 100, 1, max_stages=1, transport=False)
    assert {Path(w.filename).name for w in record} == {Path(__file__).name}
    engine = EKIInference(linear_gaussian.model, "smc", ensemble_size=100, max_iterations=1)
    with pytest.warns(UserWarning, match="max_stages=1") as record:
        engine.run(jax.random.PRNGKey(0), *args, y=y)
    assert {Path(w.filename).name for w in record} == {Path(__file__).name}


def test_smc_predictive_noise_is_keyed_by_chain_markov_chain_and_state(linear):
    """Chain 0's noise for Markov chain i's b-th state is the same beside another chain
    and with a longer extension (7 states per Markov chain instead of 5)."""
    noise = linear[2].noise
    key = jax.random.PRNGKey(3)
    alone = np.asarray(predictive_noise_draws(noise, key, 1, 4, 20))
    beside = np.asarray(predictive_noise_draws(noise, key, 2, 4, 28))
    m = noise.dim
    assert alone.shape == (1, 20, m) and beside.shape == (2, 28, m)
    np.testing.assert_array_equal(alone[0].reshape(4, 5, m), beside[0].reshape(4, 7, m)[:, :5])
    assert not np.allclose(beside[0], beside[1])
    with pytest.raises(ValueError, match="not 4 Markov chains"):
        predictive_noise_draws(noise, key, 1, 4, 21)


def test_pooled_log_evidence():
    """log of the mean of the chains' Ẑ (each unbiased), NaN where a chain has none."""
    logs = np.array([-3.0, -1.0, -2.0])
    assert pooled_log_evidence(logs) == pytest.approx(np.log(np.mean(np.exp(logs))), rel=1e-12)
    assert pooled_log_evidence([-1e4, -1e4 + np.log(3.0)]) == pytest.approx(-1e4 + np.log(2.0))
    assert np.isnan(pooled_log_evidence([-1.0, np.nan]))


def test_an_unfinished_run_reports_no_evidence(linear):
    """Stopped before t = 1, a chain's normaliser is that of a tempered target, not p(y):
    the result's log evidence is NaN (the warning says so); the history keeps the value."""
    _, _, problem = linear
    with pytest.warns(UserWarning, match=r"chains \[0\] have no log evidence"):
        result = run_smc(problem, jax.random.PRNGKey(0), 100, 1, max_stages=1, transport=False)
    assert float(result.history.t[0, -1]) < 1.0
    assert np.isnan(result.log_evidence).all()
    assert np.isfinite(result.history.log_evidence).all()


def test_resample_move_warns_when_its_moves_fall_short(linear):
    """Resample-move with 40 particles for d = 5 (below 10 d) and one random-walk move a
    stage (not enough to decorrelate): both warnings name the option and the stages."""
    _, _, problem = linear
    with pytest.warns(UserWarning) as record:
        run_smc(
            problem,
            jax.random.PRNGKey(0),
            40,
            2,
            waste_free=False,
            max_moves=1,
            p_kalman=0.0,
            p_independent=0.0,
        )
    text = " ".join(str(w.message) for w in record)
    assert "num_particles=40" in text and "10 × d = 50" in text
    assert "stopped at max_moves=1" in text and "stage 1: chains [0, 1]" in text


def test_small_populations_and_a_short_extension_are_warned_about(linear):
    """100 particles for d = 5 (fewer than 10 d effective draws in a stage) and no
    extension at t = 1: both warnings say what happened, naming the chains concerned."""
    _, _, problem = linear
    with pytest.warns(UserWarning) as record:
        run_smc(problem, jax.random.PRNGKey(0), 100, 2, max_final_moves=0)
    text = " ".join(str(w.message) for w in record)
    assert "effective sample size fell to" in text and "10 × d = 50" in text
    assert "max_final_moves=0 allows no extension" in text

"""The scheduler-study benchmark (benchmarks/scheduler_study.py) at tiny size: its core
function returns the documented structure, the DMC run ends at exactly T = 1, the
EKP-style iterative UKI inflates by Δt·Σ_ω, and a blow-up is reported, not raised."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import scheduler_study as study  # noqa: E402

from eki_infer.noise import ScalarNoise  # noqa: E402
from eki_infer.processes import EnsembleFailureError, sigma_points  # noqa: E402
from models import exp_sine  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return exp_sine.simulate_data(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def dmc_run(data):
    args, y = data
    return study.run_config(
        "eki",
        "dmc",
        args,
        y,
        num_ensembles=2,
        ensemble_size=20,
        max_iterations=50,
        rng_key=jax.random.PRNGKey(0),
    )


def test_dmc_run_structure_and_termination(dmc_run):
    r = dmc_run
    assert r["status"] == "ok" and r["message"] == ""
    assert r["method"] == "eki" and r["scheduler"] == "dmc" and r["num_chains"] == 2
    n = r["t"].shape[1]
    assert r["error"].shape == r["spread"].shape == (2, n + 1)
    assert r["mean"].shape == (2, n + 1, 2) and r["cov"].shape == (2, n + 1, 2, 2)
    assert r["theta_final"].shape == (2, 20, 2)
    assert r["post_mean"].shape == (2, 2) and r["post_cov"].shape == (2, 2, 2)
    # DMC stops at exactly T = 1: the steps sum to 1 in every ensemble.
    np.testing.assert_allclose(r["T"], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r["dt"].sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all((r["iterations"] >= 1) & (r["iterations"] <= 50))
    # error = ‖θ̄ − θ*‖² + spread, both from the same members.
    assert np.all(r["error"] >= r["spread"]) and np.all(r["spread"] >= 0)
    assert np.all(r["spread"][:, 0] > 1.0)  # the prior: v ~ N(0, 5²)
    assert np.all(r["spread"][:, -1] < r["spread"][:, 0])
    assert r["exploded_chains"] == 0


def test_tables_markdown_and_json(dmc_run, data):
    args, y = data
    q_mean, q_cov = exp_sine.exact_posterior(*args, y)
    results = dict(
        setting=dict(
            num_ensembles=2,
            ensemble_size=20,
            max_iterations=50,
            small=True,
            nuts=None,
            seed=0,
            data_seed=0,
            y=np.asarray(y),
            y_noise_free=np.asarray(exp_sine.forward(1.0, 0.8, args[0])),
            truth=study.TRUTH,
            t=np.asarray(args[0]),
        ),
        reference=dict(
            quadrature=dict(mean=q_mean, sd=np.sqrt(np.diag(q_cov)), cov=q_cov),
            quadrature_main_mode=dict(mean=q_mean, sd=np.sqrt(np.diag(q_cov)), cov=q_cov),
            mirror_mass=0.01,
        ),
        runs={"eki/dmc": dict(dmc_run, group="eki")},
        seconds=1.0,
    )
    (row,) = study.iterations_table(results)
    assert row["config"] == "eki/dmc" and row["T_median"] == pytest.approx(1.0)
    assert row["iterations_min"] <= row["iterations_median"] <= row["iterations_max"]
    (post,) = study.posterior_table(results)
    assert len(post["mean_error_sd"]) == 2 and all(x > 0 for x in post["sd_ratio"])
    # From EKI + DMC alone only the "10-20 steps" claim can be decided.
    (claim,) = study.claims(results)
    assert claim["claim"].startswith("DMC terminates") and "median" in claim["evidence"]
    assert claim["verdict"] in ("confirmed", "partly", "contradicted")
    text = study.markdown(results)
    assert "## Iterations to termination" in text and "| eki/dmc | ok |" in text
    json.dumps(study.summary(results))  # JSON-able: no numpy leftovers, no NaN


def test_ekp_iterative_uki_inflates_by_dt():
    process = study.ekp_iterative_uki()
    process = process._replace(points=jax.jit(process.points), update=jax.jit(process.update))
    state = process.init(jax.random.PRNGKey(0), 2)
    # The first sigma points are the prior's (no inflation before the first step).
    np.testing.assert_allclose(
        process.points(state), sigma_points(jnp.zeros(2), jnp.eye(2)), atol=1e-14
    )
    noise = ScalarNoise(0.1, 3)
    h = jnp.array([[1.0, 0.5], [0.0, 1.0], [2.0, -1.0]])
    y = jnp.array([0.3, -0.2, 1.0])
    outputs = process.points(state) @ h.T
    new = process.update(jax.random.PRNGKey(0), state, outputs, jnp.zeros(5, bool), y, noise, 0.25)
    np.testing.assert_allclose(new.evolution_cov, 0.25 * np.eye(2))
    assert np.all(np.linalg.eigvalsh(np.asarray(new.cov)) < 1.0)  # data shrank C
    np.testing.assert_allclose(
        process.points(new), sigma_points(new.mean, new.cov + 0.25 * jnp.eye(2)), atol=1e-12
    )
    same = process.update(jax.random.PRNGKey(0), new, outputs, jnp.zeros(5, bool), y, noise, 0.0)
    for a, b in zip(same, new, strict=True):
        np.testing.assert_array_equal(a, b)


def test_blow_up_is_reported_not_raised(data):
    args, y = data

    class Exploding:
        def __init__(self, model, **kwargs):
            pass

        def run(self, *args, **kwargs):
            raise EnsembleFailureError(
                "Iteration 3: only 0 of 50 ensemble members returned finite forward-map "
                "outputs in chain(s) 0 (50 failed)"
            )

    r = study.run_config(
        "eks",
        "fixed_long",
        args,
        y,
        num_ensembles=2,
        ensemble_size=10,
        max_iterations=50,
        rng_key=jax.random.PRNGKey(0),
        engine_cls=Exploding,
    )
    assert r["status"] == "blew_up" and r["fail_iteration"] == 3
    assert r["message"].startswith("EnsembleFailureError: Iteration 3")
    assert "error" not in r

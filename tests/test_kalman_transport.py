"""The Kalman transport of tempered SMC: its map against the closed-form Gaussian update,
in both the data-space and the ensemble-space form, and its cross-fitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eki_infer.kalman_transport import (
    TransportMap,
    apply_cross_fitted,
    cross_fitted_maps,
    kalman_transport_map,
    transport_log_weights,
)
from eki_infer.noise import DiagonalNoise


def _linear_population(num, dim, data_dim, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(num, dim)) * 0.7 + 0.3
    forward = rng.normal(size=(data_dim, dim))
    variance = rng.uniform(0.5, 2.0, size=data_dim)
    y = forward @ rng.normal(size=dim) + rng.normal(size=data_dim) * np.sqrt(variance)
    return u, u @ forward.T, forward, variance, y


def _closed_form(u, forward, variance, y, delta, jitter=1e-6):
    """Kalman update by y ~ N(A u, Γ / Δ) of the sample moments (the gain from the sample
    covariance C, the result from the regularised C + εI the proposals use too)."""
    mean = u.mean(0)
    cov = np.cov(u.T, bias=True)
    gain = cov @ forward.T @ np.linalg.inv(forward @ cov @ forward.T + np.diag(variance) / delta)
    regularised = cov + (jitter * np.trace(cov) / u.shape[1] + 1e-10) * np.eye(u.shape[1])
    return mean + gain @ (y - forward @ mean), regularised - gain @ forward @ cov, regularised


@pytest.mark.parametrize("data_dim", [3, 40])  # M ≤ N: data space; M > N: ensemble space
def test_map_is_the_gaussian_update(data_dim):
    num, dim, t = 25, 4, 0.3
    u, g, forward, variance, y = _linear_population(num, dim, data_dim)
    noise = DiagonalNoise(jnp.asarray(variance))
    misfit = 0.5 * np.sum((g - y) ** 2 / variance, axis=1)
    tmap = kalman_transport_map(
        jnp.asarray(u),
        jnp.asarray(g),
        jnp.asarray(misfit),
        t,
        jnp.asarray(y),
        noise,
        jnp.ones(num, bool),
    )
    mean, cov, prior_cov = _closed_form(u, forward, variance, y, 1.0 - t)
    np.testing.assert_allclose(tmap.target_mean, mean, rtol=1e-9, atol=1e-10)
    # the affine map carries the population's (regularised) covariance onto the update's
    a = np.asarray(tmap.matrix)
    np.testing.assert_allclose(a @ prior_cov @ a.T, cov, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(tmap.log_det, np.linalg.slogdet(a)[1], rtol=1e-10)
    # failed particles (infinite misfit) are left out of the moments
    bad = misfit.copy()
    bad[:5] = np.inf
    g_bad = g.copy()
    g_bad[:5] = np.nan
    partial = kalman_transport_map(
        jnp.asarray(u),
        jnp.asarray(g_bad),
        jnp.asarray(bad),
        t,
        jnp.asarray(y),
        noise,
        jnp.ones(num, bool),
    )
    mean5, cov5, prior5 = _closed_form(u[5:], forward, variance, y, 1.0 - t)
    np.testing.assert_allclose(partial.target_mean, mean5, rtol=1e-9, atol=1e-10)
    a5 = np.asarray(partial.matrix)
    np.testing.assert_allclose(a5 @ prior5 @ a5.T, cov5, rtol=1e-8, atol=1e-12)


def test_cross_fitting_moves_each_fold_by_the_other_folds_map():
    num, dim = 40, 3
    u, g, forward, variance, y = _linear_population(num, dim, 5, seed=1)
    noise = DiagonalNoise(jnp.asarray(variance))
    misfit = 0.5 * np.sum((g - y) ** 2 / variance, axis=1)
    fold = jnp.arange(num) % 2
    maps = cross_fitted_maps(
        jnp.asarray(u), jnp.asarray(g), jnp.asarray(misfit), 0.0, jnp.asarray(y), noise, fold
    )
    for f in (0, 1):
        rows = np.asarray(fold) == f
        mean, _, _ = _closed_form(u[rows], forward, variance, y, 1.0)
        np.testing.assert_allclose(maps.target_mean[f], mean, rtol=1e-9, atol=1e-10)
    moved, log_det = apply_cross_fitted(maps, jnp.asarray(u), fold)
    other = 1 - np.asarray(fold)
    expected = np.stack(
        [
            np.asarray(maps.target_mean[o])
            + np.asarray(maps.matrix[o]) @ (u[i] - np.asarray(maps.mean[o]))
            for i, o in enumerate(other)
        ]
    )
    np.testing.assert_allclose(moved, expected, rtol=1e-12)
    np.testing.assert_allclose(log_det, np.asarray(maps.log_det)[other])


def test_weights_are_exact_importance_weights():
    """log w = log π̃_1(T u) − log π̃_t(u) + log|det A|; a failed moved particle gets −∞."""
    u = jnp.array([[0.5, -1.0], [2.0, 0.1]])
    moved = jnp.array([[0.1, 0.2], [0.3, -0.4]])
    misfit = jnp.array([3.0, 1.0])
    moved_misfit = jnp.array([0.5, jnp.inf])
    log_w = transport_log_weights(u, misfit, 0.25, moved, moved_misfit, 0.7)
    expected0 = (-0.5 * (0.01 + 0.04) - 0.5) - (-0.5 * (0.25 + 1.0) - 0.25 * 3.0) + 0.7
    assert float(log_w[0]) == pytest.approx(expected0, rel=1e-12)
    assert float(log_w[1]) == -np.inf
    # at t = 0 the source density is the prior's: a prior draw whose own run failed
    # (misfit +∞) still carries its image's weight
    failed_source = transport_log_weights(u, jnp.array([jnp.inf, 1.0]), 0.0, moved, misfit, 0.7)
    expected = (-0.5 * (0.01 + 0.04) - 3.0) - (-0.5 * (0.25 + 1.0)) + 0.7
    assert float(failed_source[0]) == pytest.approx(expected, rel=1e-12)
    # at t > 0 such a particle has no density under π_t: weight zero
    assert (
        float(transport_log_weights(u, jnp.array([jnp.inf, 1.0]), 0.5, moved, misfit, 0.7)[0])
        == -np.inf
    )


def test_a_non_finite_map_leaves_its_rows_in_place_with_zero_weight():
    """A fold whose fitted map is not finite (a degenerate population) moves nothing: its
    rows stay put, so the forward map never sees NaN, with log |det| = −∞ (weight zero)."""
    u = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2)))
    fold = jnp.arange(6) % 2
    maps = TransportMap(
        mean=jnp.zeros((2, 2)),
        target_mean=jnp.array([[0.5, -0.5], [jnp.nan, 0.0]]),
        matrix=jnp.stack([0.5 * jnp.eye(2), jnp.eye(2)]),
        log_det=jnp.array([2 * np.log(0.5), 0.0]),
    )
    moved, log_det = apply_cross_fitted(maps, u, fold)
    rows0 = np.asarray(fold) == 0  # moved by fold 1's (broken) map
    np.testing.assert_array_equal(np.asarray(moved)[rows0], np.asarray(u)[rows0])
    assert np.all(np.asarray(log_det)[rows0] == -np.inf)
    np.testing.assert_allclose(np.asarray(moved)[~rows0], 0.5 * np.asarray(u)[~rows0] + [0.5, -0.5])
    np.testing.assert_allclose(np.asarray(log_det)[~rows0], 2 * np.log(0.5))


def test_transport_and_resample_updates_the_evidence_and_resamples_the_images():
    """log Z gains log Σ W_i w_i; the resampled population is made of the moved particles
    with their outputs and misfits, at t = 1 and equal weights."""
    from eki_infer.smc import SMCState, transport_and_resample

    rng = np.random.default_rng(4)
    n, d, m = 50, 2, 3
    u = jnp.asarray(rng.normal(size=(n, d)))
    outputs = jnp.asarray(rng.normal(size=(n, m)))
    y = jnp.zeros(m)
    noise = DiagonalNoise(jnp.full(m, 0.5))
    misfit = 0.5 * jnp.sum(outputs**2 / 0.5, axis=1)
    state = SMCState(
        particles=u,
        outputs=outputs,
        misfit=misfit,
        log_weights=jnp.full(n, -np.log(n)),
        t=jnp.asarray(0.25),
        log_z=jnp.asarray(-1.5),
        rw_scale=jnp.asarray(1.0),
        kalman_step=jnp.asarray(0.5),
        p_kalman=jnp.asarray(0.5),
    )
    moved = 0.8 * u + 0.1
    moved_outputs = jnp.asarray(rng.normal(size=(n, m)))
    new, ess, finite = transport_and_resample(
        jax.random.PRNGKey(0), state, moved, moved_outputs, jnp.full(n, np.log(0.64)), y, noise
    )
    moved_misfit = 0.5 * np.sum(np.asarray(moved_outputs) ** 2 / 0.5, axis=1)
    log_w = (
        -0.5 * np.sum(np.asarray(moved) ** 2, 1)
        - moved_misfit
        + 0.5 * np.sum(np.asarray(u) ** 2, 1)
        + 0.25 * np.asarray(misfit)
        + np.log(0.64)
    )
    expected_increment = np.log(np.mean(np.exp(log_w)))
    assert float(new.log_z) == pytest.approx(-1.5 + expected_increment, rel=1e-10)
    w = np.exp(log_w - log_w.max())
    assert float(ess) == pytest.approx(w.sum() ** 2 / (w**2).sum() / n, rel=1e-10)
    assert int(finite) == n and float(new.t) == 1.0
    rows = [
        int(np.argmin(np.sum((np.asarray(moved) - p) ** 2, 1))) for p in np.asarray(new.particles)
    ]
    np.testing.assert_allclose(new.particles, np.asarray(moved)[rows])
    np.testing.assert_allclose(new.misfit, moved_misfit[rows], rtol=1e-12)
    np.testing.assert_allclose(new.log_weights, -np.log(n))

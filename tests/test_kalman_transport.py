"""The Kalman transport of tempered SMC: its map against the closed-form Gaussian update,
in both the data-space and the ensemble-space form, and its cross-fitting."""

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
    mean5, _, _ = _closed_form(u[5:], forward, variance, y, 1.0 - t)
    np.testing.assert_allclose(partial.target_mean, mean5, rtol=1e-9, atol=1e-10)


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

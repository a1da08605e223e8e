"""Separated groups of a population (eki_infer.population_groups), which SMC's
independence proposal fits one t component each."""

import jax.numpy as jnp
import numpy as np

from eki_infer.population_groups import split_groups, two_means


def _split(points):
    points = jnp.asarray(points)
    return np.asarray(split_groups(points, jnp.ones(points.shape[0], bool)))


def test_a_small_far_group_is_found_whole():
    """A group of 3 % of the particles, 10 sds away: 2-means would halve the big group
    instead; the best-separated candidate isolates the small one exactly."""
    rng = np.random.default_rng(0)
    big = rng.normal(size=(970, 3)) * np.array([3.0, 1.0, 1.0])
    small = rng.normal(size=(30, 3)) + np.array([0.0, 10.0, 0.0])
    found = _split(np.concatenate([big, small]))
    assert found[970:].all() and not found[:970].any()


def test_one_gaussian_a_flat_ridge_and_an_outlier_are_not_split():
    """Halves of a Gaussian (D ≈ 2.7) and the best-separated split of a long flat ridge
    stay below the bar of 3; one far particle is not a group (fewer than d + 2
    particles)."""
    rng = np.random.default_rng(1)
    gaussian = rng.normal(size=(1000, 4))
    ridge = np.stack([rng.uniform(-10.0, 10.0, 1000), 0.1 * rng.normal(size=1000)], -1)
    outlier = np.concatenate([rng.normal(size=(999, 2)), [[50.0, 0.0]]])
    for points in (gaussian, ridge, outlier):
        assert not _split(points).any()
    _, d = two_means(jnp.asarray(ridge), jnp.ones(1000, bool), 4)
    assert float(d) < 3.0


def test_dead_particles_do_not_count():
    """Particles whose forward run failed (not live) neither form nor join a group."""
    rng = np.random.default_rng(2)
    points = np.concatenate([rng.normal(size=(500, 2)), rng.normal(size=(20, 2)) + 30.0])
    live = np.ones(520, bool)
    live[500:] = False
    assert not np.asarray(split_groups(jnp.asarray(points), jnp.asarray(live))).any()
    live[500:] = True
    assert np.asarray(split_groups(jnp.asarray(points), jnp.asarray(live)))[500:].all()

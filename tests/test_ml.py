"""EKI for machine learning: the loss-general update against Gaussian EKI, the loss
gradients, momentum and re-spreading checked by hand, a classifier well above chance,
the NumPyro optimisation mode and streaming updates.

Why the squared-error comparison is exact: the processes' perturbed EKI update is
u ← u + C^{uG}(C^{GG} + Γ/Δt)⁻¹(y + η^(j) − G(u^(j))). By the push-through identity this is
u ← u − Δt D (I_J + Δt C)⁻¹ (u − ū) with D_jk = 1/J ⟨G_k − Ḡ, Γ⁻¹(G_j − y − η_j)⟩ — the
loss-general D for Ψ_j(z) = ½‖Γ^{-1/2}(z − y − η_j)‖² — and C the whitened output
covariance in ensemble space, which is what the ``"kalman"`` form builds from the loss
gradients. Feeding the loss-general update the very perturbations the process draws
(same key, same split) therefore reproduces it to rounding error. The paper's
``"explicit"`` scheme is the same update without the (I + Δt C)⁻¹ factor (the explicit
Euler step of the EKI flow); it is checked against the dense formula, and its difference
from the Kalman form is second order in Δt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from eki_infer.ml import (
    EKIOptimizer,
    OnlineEKI,
    apply_respread,
    best_particle,
    cross_entropy,
    cross_entropy_logits,
    eki_ml,
    ensemble_d_matrix,
    ensemble_forward,
    fit,
    fit_pytree,
    glorot_scale,
    loss_eki_update,
    loss_gradients,
    member_losses,
    momentum_point,
    predict,
    respread_schedule,
    squared_error,
)
from eki_infer.noise import DenseNoise, DiagonalNoise, ScalarNoise
from eki_infer.processes import eki_perturbed_update, eki_transform_update
from eki_infer.tracing.errors import ModelTracingError


def _problem(j=12, d=5, m=7, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    u = jax.random.normal(k[0], (j, d))
    a = jax.random.normal(k[1], (d, m))
    g = jnp.tanh(u @ a) + 0.1 * (u @ a) ** 2
    y = jax.random.normal(k[2], (m,))
    lower = 0.3 * jnp.tril(jax.random.normal(k[3], (m, m))) + jnp.eye(m)
    return u, g, y, lower @ lower.T


NOISES = {
    "dense": lambda cov: DenseNoise(cov),
    "diagonal": lambda cov: DiagonalNoise(jnp.diag(cov)),
    "scalar": lambda cov: ScalarNoise(0.7, cov.shape[0]),
}


# ------------------------------------------------------- squared error is Gaussian EKI


@pytest.mark.parametrize(
    ("kind", "dt"), [("dense", 0.05), ("dense", 2.0), ("diagonal", 0.37), ("scalar", 0.37)]
)
def test_squared_error_equals_perturbed_eki(kind, dt):
    u, g, y, cov = _problem()
    noise = NOISES[kind](cov)
    key = jax.random.PRNGKey(5)
    reference = eki_perturbed_update(key, u, g, y, noise, dt)
    # The process draws whitened ξ from the first half of its key: η = W⁻¹ ξ / √Δt.
    k_obs, _ = jax.random.split(key)
    xi = jax.random.normal(k_obs, g.shape)
    perturbed = y + noise.unwhiten(xi) / jnp.sqrt(dt)
    mine, info = loss_eki_update(
        u, g, perturbed, squared_error(noise), dt, adaptive=False, form="kalman"
    )
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-12)
    assert float(info.step_size) == pytest.approx(dt)


def test_squared_error_mean_equals_transform_eki():
    """Without perturbations the Kalman form moves the ensemble mean exactly as the
    square-root (transform) EKI does; only the anomalies are treated differently."""
    u, g, y, cov = _problem(seed=1)
    noise = DenseNoise(cov)
    reference = eki_transform_update(jax.random.PRNGKey(0), u, g, y, noise, 0.4)
    mine, _ = loss_eki_update(u, g, y, squared_error(noise), 0.4, adaptive=False, form="kalman")
    np.testing.assert_allclose(mine.mean(0), reference.mean(0), rtol=0, atol=1e-12)


def test_explicit_form_is_the_dense_eki_flow_step():
    u, g, y, cov = _problem(seed=2)
    noise = DenseNoise(cov)
    h = 0.3
    mine, info = loss_eki_update(u, g, y, squared_error(noise), h)
    gi = np.asarray(g) - np.asarray(g).mean(0)
    ui = np.asarray(u) - np.asarray(u).mean(0)
    c_ug = ui.T @ gi / len(u)
    resid = np.linalg.solve(np.asarray(cov), (np.asarray(g) - np.asarray(y)).T)  # Γ⁻¹(G_j − y)
    d_dense = resid.T @ gi.T / len(u)  # D_jk = 1/J ⟨G_k − Ḡ, Γ⁻¹(G_j − y)⟩
    step = h / (np.linalg.norm(d_dense) + 1e-8)
    expected = np.asarray(u) - step * (c_ug @ resid).T
    np.testing.assert_allclose(mine, expected, rtol=1e-12, atol=1e-12)
    # D u = D (u − ū): rows of D sum to zero.
    grads = loss_gradients(squared_error(noise), g, y)
    d = ensemble_d_matrix(g, grads)
    np.testing.assert_allclose(d, d_dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.sum(1), 0.0, atol=1e-12)
    assert float(info.step_size) == pytest.approx(step)


def test_explicit_and_kalman_forms_agree_to_first_order():
    u, g, y, cov = _problem(seed=3)
    loss = squared_error(DenseNoise(cov))
    gaps = []
    for dt in (1e-2, 1e-3):
        a, _ = loss_eki_update(u, g, y, loss, dt, adaptive=False, form="explicit")
        b, _ = loss_eki_update(u, g, y, loss, dt, adaptive=False, form="kalman")
        gaps.append(float(jnp.max(jnp.abs(a - b))))
    assert gaps[1] < gaps[0] / 50  # second order: a factor 100 per decade


# --------------------------------------------------------------------------- losses


def test_cross_entropy_gradient_closed_form_and_finite_differences():
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (4, 6, 3))  # J = 4 members, batch 6, 3 classes
    z = jax.nn.softmax(logits, axis=-1)
    labels = jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0, 2]), 3)
    grads = loss_gradients(cross_entropy, z, labels)
    np.testing.assert_allclose(grads, -labels / z, rtol=1e-12)  # ∇Ψ = −y / z
    # central finite differences of Ψ at one member
    z0 = np.asarray(z[1])
    eps = 1e-6
    fd = np.zeros_like(z0)
    for idx in np.ndindex(z0.shape):
        e = np.zeros_like(z0)
        e[idx] = eps
        fd[idx] = (cross_entropy(z0 + e, labels) - cross_entropy(z0 - e, labels)) / (2 * eps)
    np.testing.assert_allclose(grads[1], fd, rtol=1e-6, atol=1e-8)


def test_cross_entropy_logits_matches_softmax_form():
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
    labels = jax.nn.one_hot(jnp.array([0, 3, 1, 2, 2]), 4)
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(
        member_losses(cross_entropy_logits, logits, labels),
        member_losses(cross_entropy, probs, labels),
        rtol=1e-12,
    )
    g_logits = loss_gradients("cross_entropy_logits", logits, labels)
    np.testing.assert_allclose(g_logits, probs - labels, atol=1e-12)  # softmax − y
    # chain rule through the softmax Jacobian from the probability-space gradient
    g_probs = loss_gradients("cross_entropy", probs, labels)
    chained = probs * (g_probs - jnp.sum(probs * g_probs, axis=-1, keepdims=True))
    np.testing.assert_allclose(g_logits, chained, atol=1e-12)


def test_per_member_data_and_pytree_outputs():
    _, g, y, _ = _problem(j=6, seed=4)
    per_member = jnp.broadcast_to(y, g.shape)
    shared = loss_gradients("squared_error", g, y)
    np.testing.assert_allclose(loss_gradients("squared_error", g, per_member), shared)
    np.testing.assert_allclose(shared, g - y)
    # a PyTree output: D sums the inner products over the leaves
    tree = {"a": g[:, :3], "b": g[:, 3:]}
    ytree = {"a": y[:3], "b": y[3:]}

    def tree_loss(z, yy):
        return 0.5 * (jnp.sum((z["a"] - yy["a"]) ** 2) + jnp.sum((z["b"] - yy["b"]) ** 2))

    d_tree = ensemble_d_matrix(tree, loss_gradients(tree_loss, tree, ytree))
    np.testing.assert_allclose(d_tree, ensemble_d_matrix(g, shared), atol=1e-12)
    with pytest.raises(ValueError, match="loss must be"):
        loss_gradients("hinge", g, y)


# ---------------------------------------------------------- momentum and re-spreading


def _linear_forward(a):
    def forward(particles, x):
        del x
        return particles @ a

    return forward


def _dense_step(v, g, y, h, eps=1e-8):
    v, g = np.asarray(v), np.asarray(g)
    gi = g - g.mean(0)
    d = (g - np.asarray(y)) @ gi.T / len(v)
    step = h / (np.linalg.norm(d) + eps)
    return v - step * d @ v, step


@pytest.mark.parametrize("momentum", ["nesterov", 0.9])
def test_momentum_step_by_hand(momentum):
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    a = jax.random.normal(k[0], (4, 6))
    y = jax.random.normal(k[1], (6,))
    u0 = jax.random.normal(k[2], (8, 4))
    forward = _linear_forward(a)
    kernel = eki_ml("squared_error", h=0.5, momentum=momentum)
    state = kernel.init(u0)
    np.testing.assert_array_equal(momentum_point(u0, u0, 0, momentum), u0)
    state, _ = kernel.step(None, state, forward, None, y)  # n = 0: v_0 = u_0
    u1_expected, _ = _dense_step(u0, np.asarray(u0) @ np.asarray(a), y, 0.5)
    np.testing.assert_allclose(state.particles, u1_expected, atol=1e-12)
    state, _ = kernel.step(None, state, forward, None, y)  # n = 1
    u1 = np.asarray(state.previous)
    u2 = np.asarray(state.particles)
    state, info = kernel.step(None, state, forward, None, y)  # n = 2, checked by hand
    # (n − 1)/(n + 2) at n = 2: the slides' v_{n+1} = u_{n+1} + n/(n+3)(u_{n+1} − u_n)
    lam = 1 / 4 if momentum == "nesterov" else 0.9
    v = u2 + lam * (u2 - u1)
    expected, step = _dense_step(v, v @ np.asarray(a), y, 0.5)
    np.testing.assert_allclose(state.particles, expected, atol=1e-12)
    np.testing.assert_array_equal(state.previous, u2)
    assert int(state.iteration) == 3
    assert float(info.step_size) == pytest.approx(step)


def test_respread_by_hand():
    u = jax.random.normal(jax.random.PRNGKey(0), (7, 3)) * 0.01 + 2.0
    key = jax.random.PRNGKey(9)
    scale = jnp.array([1.0, 0.5, 2.0])
    z = np.asarray(jax.random.normal(key, u.shape))
    ubar = np.asarray(u).mean(0)
    out = apply_respread(key, u, 0.3, scale, center=False)
    np.testing.assert_allclose(out, ubar + 0.3 * np.asarray(scale) * z, atol=1e-12)
    out = apply_respread(key, u, 0.3, scale)  # centred draws: the mean is kept exactly
    np.testing.assert_allclose(out, ubar + 0.3 * np.asarray(scale) * (z - z.mean(0)), atol=1e-12)
    np.testing.assert_allclose(out.mean(0), ubar, atol=1e-12)


def test_respread_schedule_and_kernel():
    gamma = respread_schedule(2.0, every=3, half_life=6)
    values = [float(gamma(n)) for n in range(9)]
    assert values == pytest.approx([0, 0, 0, 2 * 2 ** (-3 / 6), 0, 0, 2 * 2 ** (-6 / 6), 0, 0])
    with pytest.raises(ValueError):
        respread_schedule(every=0)
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    a = jax.random.normal(k[0], (4, 6))
    y = jax.random.normal(k[1], (6,))
    u0 = jax.random.normal(k[2], (8, 4))
    forward = _linear_forward(a)
    a_np = np.asarray(a)
    kernel = eki_ml(
        "squared_error", h=0.5, momentum="nesterov", respread=respread_schedule(0.25, every=2)
    )
    state = kernel.init(u0)
    state, info = kernel.step(jax.random.PRNGKey(10), state, forward, None, y)  # n = 0
    assert float(info.gamma) == 0.0
    state, info = kernel.step(jax.random.PRNGKey(10), state, forward, None, y)  # n = 1
    assert float(info.gamma) == 0.0
    u2 = state.particles
    key = jax.random.PRNGKey(11)
    state, info = kernel.step(key, state, forward, None, y)  # n = 2: re-spread, then step
    assert float(info.gamma) == 0.25
    spread = np.asarray(apply_respread(key, u2, 0.25, 1.0))
    np.testing.assert_allclose(spread.mean(0), np.asarray(u2).mean(0), atol=1e-12)
    # the re-spread restarts the momentum: v = the re-spread ensemble itself
    expected, _ = _dense_step(spread, spread @ a_np, y, 0.5)
    np.testing.assert_allclose(state.particles, expected, atol=1e-12)
    np.testing.assert_allclose(state.previous, spread, atol=1e-12)
    assert int(state.momentum_iteration) == 1
    u3 = np.asarray(state.particles)
    state, _ = kernel.step(key, state, forward, None, y)  # n = 3: λ = (k − 1)/(k + 2) = 0
    np.testing.assert_allclose(state.particles, _dense_step(u3, u3 @ a_np, y, 0.5)[0], atol=1e-12)


def test_invalid_options():
    with pytest.raises(ValueError, match="form"):
        eki_ml("squared_error", form="implicit")
    with pytest.raises(ValueError, match="momentum"):
        eki_ml("squared_error", momentum=1.5)
    with pytest.raises(ValueError, match="particles"):
        eki_ml("squared_error").init(jnp.zeros(3))
    with pytest.raises(ValueError, match="variant"):
        fit_pytree(
            jax.random.PRNGKey(0),
            lambda p, x: x,
            {"w": jnp.zeros(2)},
            jnp.zeros((4, 2)),
            jnp.zeros((4, 2)),
            variant="adam",
        )


# ------------------------------------------------------------------------ training


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _mlp_params(key, sizes):
    k1, k2 = jax.random.split(key)
    (n_in, n_hidden, n_out) = sizes
    return {
        "w1": jax.random.normal(k1, (n_in, n_hidden)) * np.sqrt(2 / (n_in + n_hidden)),
        "b1": jnp.zeros(n_hidden),
        "w2": jax.random.normal(k2, (n_hidden, n_out)) * np.sqrt(2 / (n_hidden + n_out)),
        "b2": jnp.zeros(n_out),
    }


def _blobs(key, n_per_class=100, dim=4, classes=3):
    k_c, k_x = jax.random.split(key)
    centres = 1.5 * jax.random.normal(k_c, (classes, dim))
    labels = jnp.repeat(jnp.arange(classes), n_per_class)
    x = centres[labels] + jax.random.normal(k_x, (classes * n_per_class, dim))
    perm = jax.random.permutation(jax.random.PRNGKey(7), labels.size)
    return x[perm], labels[perm]


def test_glorot_scale_and_forward():
    params = {"w": jnp.zeros((3, 5)), "b": jnp.zeros(5), "k": jnp.zeros((2, 2, 4, 6))}
    s = glorot_scale(params, bias_scale=0.2)
    flat = jax.flatten_util.ravel_pytree(params)[0]
    assert s.shape == flat.shape
    tree = jax.flatten_util.ravel_pytree(params)[1](s)
    np.testing.assert_allclose(tree["w"], np.sqrt(2 / 8))
    np.testing.assert_allclose(tree["b"], 0.2)
    np.testing.assert_allclose(tree["k"], np.sqrt(2 / (10 * 4)))


def test_eki_classifier_beats_chance_synthetic():
    x, labels = _blobs(jax.random.PRNGKey(0))
    y = jax.nn.one_hot(labels, 3)
    xtr, ytr, xte, lte = x[:200], y[:200], x[200:], labels[200:]
    params = _mlp_params(jax.random.PRNGKey(1), (4, 8, 3))
    result = fit_pytree(
        jax.random.PRNGKey(2),
        _mlp,
        params,
        xtr,
        ytr,
        ensemble_size=40,
        epochs=10,
        batch_size=50,
        variant="eki_r",
    )
    for p in (result.params, result.best_params):
        accuracy = float(jnp.mean(_mlp(p, xte).argmax(-1) == lte))
        assert accuracy > 0.8  # chance is 1/3
    assert result.history["loss"][-1] < result.history["loss"][0] / 2
    assert result.history["forward_evaluations"][-1] == 10 * 200 * 40


@pytest.mark.parametrize("variant", ["meki_r"])
def test_other_variants_train(variant):
    x, labels = _blobs(jax.random.PRNGKey(3))
    y = jax.nn.one_hot(labels, 3)
    params = _mlp_params(jax.random.PRNGKey(1), (4, 8, 3))
    result = fit_pytree(
        jax.random.PRNGKey(4),
        _mlp,
        params,
        x,
        y,
        ensemble_size=40,
        epochs=8,
        batch_size=100,
        variant=variant,
    )
    assert float(jnp.mean(_mlp(result.params, x).argmax(-1) == labels)) > 0.7


def test_digits_classifier():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = jnp.asarray(digits.data / 16.0)
    labels = jnp.asarray(digits.target)
    y = jax.nn.one_hot(labels, 10)
    params = _mlp_params(jax.random.PRNGKey(0), (64, 16, 10))
    result = fit_pytree(
        jax.random.PRNGKey(1),
        _mlp,
        params,
        x[:1200],
        y[:1200],
        ensemble_size=100,
        epochs=10,
        batch_size=50,
    )
    accuracy = float(jnp.mean(_mlp(result.params, x[1200:]).argmax(-1) == labels[1200:]))
    assert accuracy > 0.8  # chance is 0.1


def test_predict_and_best_particle():
    a = jnp.eye(3)
    forward = _linear_forward(a)
    particles = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    y = jnp.ones(3)
    assert int(best_particle("squared_error", forward, particles, None, y)) == 1
    np.testing.assert_allclose(predict(forward, particles, None), jnp.ones(3))
    np.testing.assert_allclose(predict(forward, particles, None, which=2), 2 * jnp.ones(3))
    assert predict(forward, particles, None, which="all").shape == (3, 3)
    with pytest.raises(ValueError):
        predict(forward, particles, None, which="median")


def _small_fit_setup(n_per_class=20, hidden=5, members=16):
    """Blobs with one-hot targets, an MLP's ensemble forward map and an ensemble."""
    x, labels = _blobs(jax.random.PRNGKey(5), n_per_class=n_per_class)
    y = jax.nn.one_hot(labels, 3)
    params = _mlp_params(jax.random.PRNGKey(1), (4, hidden, 3))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    forward = ensemble_forward(_mlp, unravel)
    particles = flat + 0.3 * jax.random.normal(jax.random.PRNGKey(6), (members, flat.size))
    return x, y, forward, particles


def test_fit_generic_forward_reuses_compilation():
    x, y, forward, particles = _small_fit_setup(n_per_class=30, hidden=6, members=20)
    kernel = eki_ml("cross_entropy_logits")
    first = fit(jax.random.PRNGKey(0), kernel, forward, particles, x, y, epochs=2, batch_size=30)
    again = fit(jax.random.PRNGKey(0), kernel, forward, particles, x, y, epochs=2, batch_size=30)
    np.testing.assert_array_equal(first.state.particles, again.state.particles)
    assert int(first.state.iteration) == 2 * 3


# ------------------------------------------------------------------------ streaming


def test_online_eki_learns_a_stream():
    key = jax.random.PRNGKey(0)
    w_true = jnp.array([1.0, -2.0, 0.5])
    xs = jax.random.normal(key, (100, 4, 3))  # 100 batches of 4 examples
    ys = xs @ w_true + 0.05 * jax.random.normal(jax.random.PRNGKey(1), (100, 4))

    def forward(particles, x):
        return particles @ x.T

    def mse(z, y):
        return jnp.mean((z - y) ** 2)

    particles = jax.random.normal(jax.random.PRNGKey(2), (30, 3))
    kernel = eki_ml("squared_error", h=0.5)
    online = OnlineEKI(kernel, forward, particles, jax.random.PRNGKey(3), score=mse)
    first = [online.update(xs[i], ys[i]) for i in range(5)]
    rest = online.update_many(xs[5:], ys[5:])
    assert rest.shape == (95,)
    assert np.mean(rest[-20:]) < 0.05 * np.mean(first)
    np.testing.assert_allclose(online.particles.mean(0), w_true, atol=0.1)
    # update_many is the same recursion as repeated update
    a = OnlineEKI(kernel, forward, particles, jax.random.PRNGKey(3), score=mse)
    b = OnlineEKI(kernel, forward, particles, jax.random.PRNGKey(3), score=mse)
    scores_a = [a.update(xs[i], ys[i]) for i in range(6)]
    scores_b = b.update_many(xs[:6], ys[:6])
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-10)
    np.testing.assert_allclose(a.particles, b.particles, rtol=1e-10)


def test_online_eki_update_checks_its_batch_and_keeps_a_finite_state():
    """update took NaN data (and then every particle was NaN for good), empty batches
    and mismatched lengths (an unnamed broadcasting error); it now checks the batch as
    update_many does, and a step that turns the ensemble non-finite raises and keeps
    the state from before it."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def forward(particles, x):  # non-finite where an input is beyond 100
        return jnp.where(jnp.abs(x).max() > 100.0, jnp.nan, 1.0) * (particles @ x.T)

    particles = jax.random.normal(jax.random.PRNGKey(2), (30, 3))
    online = OnlineEKI(
        eki_ml("squared_error", h=0.5),
        forward,
        particles,
        jax.random.PRNGKey(3),
        score="squared_error",
    )
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        online.update(x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="x and y hold no examples"):
        online.update(x[:0], y[:0])
    with pytest.raises(ValueError, match="same number of examples"):
        online.update(x, y[:4])
    np.testing.assert_array_equal(online.particles, particles)
    online.update(x, y)
    before = np.asarray(online.particles)
    with pytest.raises(FloatingPointError, match="OnlineEKI update 1 made the ensemble"):
        online.update(x.at[0, 0].set(1e3), y)
    np.testing.assert_array_equal(online.particles, before)
    assert online.count == 1


def test_nesterov_coefficients_are_the_slides():
    """Kovachki & Stuart: v_{n+1} = u_{n+1} + n/(n+3)(u_{n+1} − u_n), v_0 = u_0, so
    λ_n = (n − 1)/(n + 2) against v_n: 0, 0, 1/4, 2/5, 1/2."""
    u, previous = jnp.ones((2, 1)), jnp.zeros((2, 1))
    lams = [float(momentum_point(u, previous, n, "nesterov")[0, 0]) - 1.0 for n in range(5)]
    np.testing.assert_allclose(lams, [0.0, 0.0, 1 / 4, 2 / 5, 1 / 2], atol=1e-15)


def test_training_input_checks_name_the_option():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    y = x @ jnp.ones(3)
    forward = _linear_forward(jnp.ones((3, 6)))
    particles = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    kernel = eki_ml("squared_error")
    with pytest.raises(ValueError, match="x and y hold no examples"):
        fit(jax.random.PRNGKey(0), kernel, forward, particles, x[:0], y[:0], epochs=1)
    with pytest.raises(TypeError, match="respread must be None or a schedule"):
        eki_ml("squared_error", respread=1.0)
    for kwargs, name in (
        ({"gamma0": -1.0}, "gamma0"),
        ({"gamma0": float("nan")}, "gamma0"),
        ({"half_life": 0}, "half_life"),
        ({"half_life": -1.0}, "half_life"),
        ({"every": 0}, "every"),
    ):
        with pytest.raises(ValueError, match=name):
            respread_schedule(**kwargs)

    def apply(params, x):
        return x @ params["w"]

    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        fit_pytree(jax.random.PRNGKey(0), apply, params, x, y, "squared_error", batch_size=0)
    with pytest.raises(ValueError, match="y contains NaN"):
        fit_pytree(
            jax.random.PRNGKey(0),
            apply,
            params,
            x,
            y,
            "squared_error",
            select_on=(x, y.at[0].set(jnp.nan)),
        )


def test_eki_optimizer_stops_on_a_non_finite_ensemble():
    """A Poisson rate that overflows: EKIOptimizer returned NaN parameters silently."""
    x = jnp.linspace(0.0, 1000.0, 20)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Poisson(jnp.exp(w * x) * 1e30).to_event(1), obs=y)

    with pytest.raises(FloatingPointError, match="EKIOptimizer: the ensemble became non-finite"):
        EKIOptimizer(model, ensemble_size=10, num_steps=5).run(
            jax.random.PRNGKey(0), x, y=jnp.ones(20)
        )


# ------------------------------------------------------------------- NumPyro models


def _newton_logistic(x, y, iters=30):
    """Maximum-likelihood logistic regression with intercept, by Newton's method."""
    xa = np.column_stack([np.asarray(x), np.ones(len(x))])
    beta = np.zeros(xa.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-xa @ beta))
        grad = xa.T @ (np.asarray(y) - p)
        hess = xa.T @ (xa * (p * (1 - p))[:, None])
        beta = beta + np.linalg.solve(hess, grad)
    return beta


def test_eki_optimizer_bernoulli_matches_mle():
    x = jax.random.normal(jax.random.PRNGKey(0), (300, 3))
    truth = jnp.array([1.5, -2.0, 0.5])
    y = jax.random.bernoulli(jax.random.PRNGKey(1), jax.nn.sigmoid(x @ truth + 0.3)).astype(int)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 2.0))
        numpyro.deterministic("intercept", b)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)

    optimiser = EKIOptimizer(model, ensemble_size=40, num_steps=100)
    result = optimiser.run(jax.random.PRNGKey(2), x, y=y)
    mle = _newton_logistic(x, y)
    np.testing.assert_allclose(result.params["w"], mle[:3], atol=0.02)
    np.testing.assert_allclose(result.params["b"], mle[3], atol=0.02)
    np.testing.assert_allclose(result.params["intercept"], result.params["b"])
    assert result.loss.shape == (100, 40)
    assert result.loss[-1].mean() < result.loss[0].mean()
    assert set(optimiser.get_params("best")) == {"w", "b", "intercept"}
    # with the whitened prior term the estimate is shrunk towards the prior mean
    shrunk = EKIOptimizer(model, ensemble_size=40, num_steps=100, objective="posterior").run(
        jax.random.PRNGKey(2), x, y=y
    )
    assert float(jnp.linalg.norm(shrunk.params["w"])) < float(jnp.linalg.norm(result.params["w"]))


def test_eki_optimizer_poisson_and_categorical():
    x = jax.random.normal(jax.random.PRNGKey(0), (300, 2))
    counts = jax.random.poisson(jax.random.PRNGKey(1), jnp.exp(x @ jnp.array([0.4, -0.3]) + 1.0))

    def poisson_model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Poisson(jnp.exp(x @ w + b)).to_event(1), obs=y)

    result = EKIOptimizer(poisson_model, ensemble_size=30, num_steps=100).run(
        jax.random.PRNGKey(2), x, y=counts
    )
    np.testing.assert_allclose(result.params["w"], [0.4, -0.3], atol=0.1)
    np.testing.assert_allclose(result.params["b"], 1.0, atol=0.1)

    weights = jnp.array([[2.0, 0.0, -2.0], [0.0, 2.0, -2.0]])
    labels = jax.random.categorical(jax.random.PRNGKey(3), x @ weights)

    def categorical_model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 3.0).expand([2, 3]).to_event(2))
        numpyro.sample("y", dist.Categorical(logits=x @ w).to_event(1), obs=y)

    result = EKIOptimizer(categorical_model, ensemble_size=30, num_steps=120).run(
        jax.random.PRNGKey(4), x, y=labels
    )
    logits = x @ result.params["w"]
    assert float(jnp.mean(logits.argmax(-1) == (x @ weights).argmax(-1))) > 0.9


def test_eki_optimizer_errors():
    def no_data():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelTracingError, match="observed"):
        EKIOptimizer(no_data).run(jax.random.PRNGKey(0))

    def discrete_latent(y=None):
        k = numpyro.sample("k", dist.Poisson(3.0))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(ModelTracingError):
        EKIOptimizer(discrete_latent).run(jax.random.PRNGKey(0), y=1.0)
    with pytest.raises(ValueError, match="objective"):
        EKIOptimizer(no_data, objective="map")
    with pytest.raises(RuntimeError):
        EKIOptimizer(no_data).get_params()


# ------------------------------------------------------------------------ bad input


def test_fit_refuses_data_that_would_train_a_wrong_objective():
    """Mismatched lengths, mismatched output/target shapes and NaN data are errors that
    name what is wrong, not a NaN or broadcast loss trained in silence."""
    x, y, forward, particles = _small_fit_setup()
    kernel = eki_ml("cross_entropy_logits")
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"same number of examples .* x: 60, y: 40"):
        fit(key, kernel, forward, particles, x, y[:40], epochs=1, batch_size=20)
    labels = jnp.argmax(y, axis=-1)  # integer labels where one-hot targets are needed
    with pytest.raises(ValueError, match=r"output has shape \(20, 3\) and the target \(20,\)"):
        fit(key, kernel, forward, particles, x, labels, epochs=1, batch_size=20)
    with pytest.raises(ValueError, match="x contains NaN"):
        fit(key, kernel, forward, particles, x.at[5, 1].set(jnp.nan), y, epochs=1, batch_size=20)
    for name, value in (("epochs", 0), ("batch_size", 0), ("batch_size", 2.7)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            fit(
                key,
                kernel,
                forward,
                particles,
                x,
                y,
                **{"epochs": 1, "batch_size": 20, name: value},
            )


def test_fit_stops_when_the_ensemble_becomes_non_finite():
    x, y, forward, particles = _small_fit_setup()

    def failing(particles, x):  # NaN output for the first member
        out = forward(particles, x)
        return out.at[0].set(jnp.nan)

    with pytest.raises(FloatingPointError, match="non-finite in epoch 0"):
        fit(
            jax.random.PRNGKey(0),
            eki_ml("cross_entropy_logits"),
            failing,
            particles,
            x,
            y,
            epochs=2,
            batch_size=20,
        )


def test_fit_resumed_from_its_state_continues_the_same_run():
    x, y, forward, particles = _small_fit_setup()
    kernel = eki_ml("cross_entropy_logits", respread=respread_schedule(1.0, every=3))
    key = jax.random.PRNGKey(3)
    whole = fit(key, kernel, forward, particles, x, y, epochs=4, batch_size=20)
    first = fit(key, kernel, forward, particles, x, y, epochs=2, batch_size=20)
    rest = fit(key, kernel, forward, None, x, y, epochs=2, batch_size=20, state=first.state)
    np.testing.assert_allclose(rest.state.particles, whole.state.particles, rtol=1e-6, atol=1e-6)
    assert rest.history["forward_evaluations"] == whole.history["forward_evaluations"][2:]


def test_option_values_are_checked():
    for kwargs, match in (
        ({"h": -1.0}, "h must be a finite positive number"),
        ({"eps": -1.0}, "eps must be a finite non-negative number"),
        ({"prior_scale": -1.0}, "prior_scale must be non-negative"),
        ({"momentum": "adam"}, "momentum must be None, 'nesterov' or in"),
    ):
        with pytest.raises(ValueError, match=match):
            eki_ml("squared_error", **kwargs)
    forward = _linear_forward(jnp.eye(3))
    with pytest.raises(ValueError, match="which=999 is not a member index"):
        predict(forward, jnp.zeros((4, 3)), None, which=999)
    particles = jnp.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(predict(forward, particles, None, which=-1), particles[-1])
    # JAX scalars are counts and numbers too
    eki_ml("squared_error", h=jnp.float32(0.5), momentum=jnp.asarray(0.5))


def test_eki_optimizer_refuses_subsampling_and_labels_outside_the_support():
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 2))
    labels = (x[:, 0] > 0).astype(jnp.int32)

    def subsampled(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=10) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

    with pytest.raises(ModelTracingError, match="plate 'data' is subsampled"):
        EKIOptimizer(subsampled, num_steps=5).run(jax.random.PRNGKey(0), x, y=labels)

    def categorical(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=x @ w), obs=y)

    with pytest.raises(ModelTracingError, match="observed site 'y' has data outside the support"):
        EKIOptimizer(categorical, num_steps=5).run(jax.random.PRNGKey(0), x, y=labels + 3)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        EKIOptimizer(categorical, num_steps=-1)

"""EKI as a derivative-free optimiser for machine learning (Kovachki & Stuart 2019).

Ensemble members u^(j) ∈ R^d (rows of a ``(J, d)`` array) are parameter vectors of a
model G(u | x) — a neural network, say. With the member outputs G(u^(j)) on a batch of
data and a loss Ψ(z, y) on the output (:mod:`eki_infer.ml.losses`), the J × J matrix

    D_jk(u) = 1/J ⟨G(u^(k)) − Ḡ, ∇_z Ψ(G(u^(j)), y)⟩

drives the discrete scheme (ALGORITHMS.md §7)

    u_{n+1} = u_n − h_n D(u_n) u_n,      h_n = h / (‖D(u_n)‖_F + ε).

Because every row of D sums to zero, D u = D (u − ū): each member moves within the span
of the ensemble's anomalies, along 1/J Σ_k ⟨G_k − Ḡ, ∇Ψ_j⟩ (u^(k) − ū) = C^{uG} ∇Ψ_j — a
derivative-free, ensemble-preconditioned gradient step (for squared error it is the
explicit Euler step of the EKI flow). Only the loss is differentiated, never G. Cost per
step: J forward passes plus O(J² (d + M)) for D and D (u − ū); no d × d or M × M matrix
is ever formed.

Two forms of the step:

- ``"explicit"`` (default, the paper's scheme above);
- ``"kalman"``: u_{n+1} = u_n − h_n D (I_J + h_n C)⁻¹ (u_n − ū_n) with
  C_jk = 1/J ⟨G_k − Ḡ, ∇Ψ(G_j, y_j) − ∇Ψ(Ḡ, y_j)⟩. For squared error,
  C = 1/J ⟨G_k − Ḡ, Γ⁻¹(G_j − Ḡ)⟩ is the whitened output covariance in ensemble space
  and this step is *exactly* the Gaussian EKI update
  u ← u + C^{uG}(C^{GG} + Γ/h_n)⁻¹(y_j − G(u^(j))) (push-through identity), with
  perturbed observations when ``y`` carries one data set per member; for other losses
  C is a secant (Gauss–Newton-like) curvature of Ψ seen through the ensemble. It damps
  steps where the loss is stiff, at the price of one J × J solve.

Extensions, each exactly as in the equations:

- **Nesterov momentum**: v_n = u_n + λ_n (u_n − u_{n−1}), u_{n+1} = v_n − h_n D(v_n) v_n,
  with λ_n = (n − 1)/(n + 2) (λ_0 = λ_1 = 0; v_0 = u_0) or a constant λ. That is the
  slides' v_{n+1} = u_{n+1} + n/(n+3)(u_{n+1} − u_n) written for v_n, and the classical
  Nesterov coefficient; ALGORITHMS.md §7 writes n/(n + 3) against v_n, which would be
  one step more momentum at every step (0, 1/4, 2/5 where the slides have 0, 0, 1/4).
- **Mini-batches**: ``step`` takes whatever batch it is given; :func:`fit` draws a fresh
  batch every step (a new random permutation each epoch).
- **Re-spreading** (the (R) variants): before the steps γ(n) > 0 selects,
  u^(j) ← ū + ξ^(j),
  ξ^(j) = γ(n) s ⊙ z^(j), z^(j) ~ N(0, I_d) (i.e. ξ ~ γ(n) μ0 with μ0 = N(0, diag s²), the
  distribution of the initial ensemble). By default the draws are centred
  (z^(j) − z̄), so the re-spread ensemble keeps its mean ū exactly and predictions from
  ū are not jolted; ``center=False`` gives the plain iid draws. A re-spread restarts
  the momentum (zero velocity, λ counter reset — as in restart schemes for Nesterov's
  method): the old members' velocities mean nothing for the new members. See
  :func:`respread_schedule` for γ(n).
- **Predictions** from the mean particle ū or the best particle u^(j*) (lowest loss on
  data the caller chooses): :func:`predict`, :func:`best_particle`.
- **Streaming**: :class:`OnlineEKI` updates from each new batch as it arrives.

Covariance normalisation is 1/J throughout, as in the rest of the package.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eki_infer.ml.losses import get_loss, inexact_leaves, loss_gradients, member_losses
from eki_infer.validation import check_count, check_number

__all__ = [
    "EKIMLInfo",
    "EKIMLKernel",
    "EKIMLState",
    "FitResult",
    "OnlineEKI",
    "apply_respread",
    "batch_indices",
    "best_particle",
    "eki_ml",
    "ensemble_d_matrix",
    "fit",
    "loss_eki_update",
    "momentum_point",
    "predict",
    "respread_schedule",
]

DEFAULT_H = 1.0
DEFAULT_EPS = 1e-8


# ------------------------------------------------------------------ the ensemble algebra


def _flat_members(tree, like=None):
    """Concatenates the floating-point leaves of a member-batched PyTree into ``(J, M)``.

    ``like`` (a PyTree of the same structure) picks which leaves count: those whose
    counterpart in ``like`` is floating point (gradients of integer leaves are float0)."""
    ref = tree if like is None else like
    leaves = jax.tree_util.tree_leaves(tree)
    ref_leaves = jax.tree_util.tree_leaves(ref)
    keep = [
        jnp.reshape(leaf, (leaf.shape[0], -1))
        for leaf, r in zip(leaves, ref_leaves, strict=True)
        if jnp.issubdtype(jnp.result_type(r), jnp.inexact)
    ]
    if not keep:
        raise ValueError("The forward-map outputs have no floating-point leaves.")
    return jnp.concatenate(keep, axis=1) if len(keep) > 1 else keep[0]


def ensemble_d_matrix(outputs, grads):
    """D_jk = 1/J ⟨G(u^(k)) − Ḡ, ∇_z Ψ(G(u^(j)), y)⟩, shape ``(J, J)``, in O(J² M).

    Args:
        outputs: member outputs, an array ``(J, ...)`` or a PyTree of them.
        grads: the loss gradients at those outputs, same structure
            (:func:`eki_infer.ml.losses.loss_gradients`).
    """
    g = _flat_members(outputs)
    e = _flat_members(grads, like=outputs).astype(g.dtype)
    j = g.shape[0]
    return e @ (g - jnp.mean(g, axis=0)).T / j


def _mean_output(outputs):
    """Ḡ leaf by leaf (integer leaves: member 0's value), with a member axis of 1."""

    def mean(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.mean(leaf, axis=0, keepdims=True)
        return leaf[:1]

    return jax.tree_util.tree_map(mean, outputs)


def _curvature_matrix(loss, outputs, y, grads):
    """C_jk = 1/J ⟨G_k − Ḡ, ∇Ψ(G_j, y_j) − ∇Ψ(Ḡ, y_j)⟩ for the ``"kalman"`` form."""
    j = jax.tree_util.tree_leaves(outputs)[0].shape[0]
    mean = jax.tree_util.tree_map(
        lambda m: jnp.broadcast_to(m, (j, *m.shape[1:])), _mean_output(outputs)
    )
    grads_mean = loss_gradients(loss, mean, y)
    e = _flat_members(grads, like=outputs) - _flat_members(grads_mean, like=outputs)
    g = _flat_members(outputs)
    return e @ (g - jnp.mean(g, axis=0)).T / j


class StepInfo(NamedTuple):
    """What one :func:`loss_eki_update` did: the step h_n and ‖D‖_F."""

    step_size: jax.Array
    d_norm: jax.Array


def loss_eki_update(
    u,
    outputs,
    y,
    loss,
    h=DEFAULT_H,
    *,
    eps=DEFAULT_EPS,
    adaptive: bool = True,
    form: str = "explicit",
):
    """One step of loss-general EKI from the ensemble ``u`` and its outputs.

    Args:
        u: ensemble, shape ``(J, d)`` (the point D is evaluated at: u_n, or v_n with
            momentum).
        outputs: G(u^(j)), an array ``(J, ...)`` or a PyTree of them.
        y: the data, shared or with a leading member axis (see
            :func:`eki_infer.ml.losses.loss_gradients`).
        loss: the loss Ψ(z, y) (callable or name).
        h: step parameter: h_n = h / (‖D‖_F + ε) when ``adaptive`` (default), else h_n = h.
        eps: ε of the adaptive step.
        adaptive: whether to normalise the step by ‖D‖_F.
        form: ``"explicit"`` (the paper's scheme) or ``"kalman"`` (see the module
            docstring; exactly Gaussian EKI for squared error).

    Returns:
        ``(u_new, StepInfo(step_size, d_norm))``.
    """
    loss = get_loss(loss)
    grads = loss_gradients(loss, outputs, y)
    d = ensemble_d_matrix(outputs, grads).astype(u.dtype)
    d_norm = jnp.linalg.norm(d)
    h = jnp.asarray(h, dtype=u.dtype)
    step = h / (d_norm + eps) if adaptive else h
    anomalies = u - jnp.mean(u, axis=0)
    if form == "explicit":
        increment = d @ anomalies
    elif form == "kalman":
        c = _curvature_matrix(loss, outputs, y, grads).astype(u.dtype)
        eye = jnp.eye(c.shape[0], dtype=u.dtype)
        increment = d @ jnp.linalg.solve(eye + step * c, anomalies)
    else:
        raise ValueError(f"form must be 'explicit' or 'kalman', got {form!r}.")
    return u - step * increment, StepInfo(step, d_norm)


def momentum_point(u, previous, iteration, momentum):
    """v_n = u_n + λ_n (u_n − u_{n−1}): λ_n = (n − 1)/(n + 2) (0 for n ≤ 1) for
    ``"nesterov"`` (Kovachki & Stuart's v_{n+1} = u_{n+1} + n/(n+3)(u_{n+1} − u_n)), the
    constant for a float, 0 for ``None``."""
    if momentum is None:
        return u
    if momentum == "nesterov":
        n = jnp.asarray(iteration, dtype=u.dtype)
        lam = jnp.maximum(n - 1.0, 0.0) / (n + 2.0)
    else:
        lam = jnp.asarray(momentum, dtype=u.dtype)
    return u + lam * (u - previous)


def apply_respread(rng_key, u, gamma, scale=1.0, *, center: bool = True):
    """Re-spreading: u^(j) ← ū + ξ^(j), ξ^(j) = γ s ⊙ z^(j), z^(j) ~ N(0, I_d).

    Args:
        rng_key: PRNG key for z (``jax.random.normal(rng_key, u.shape)``).
        u: ensemble ``(J, d)``.
        gamma: γ ≥ 0 (γ = 0 collapses the ensemble onto its mean; callers skip the call
            when they do not want a re-spread).
        scale: s, the prior standard deviation (scalar or ``(d,)``); μ0 = N(0, diag s²).
        center: subtract the draws' mean so that the new ensemble's mean is exactly ū.
    """
    z = jax.random.normal(rng_key, u.shape, dtype=u.dtype)
    if center:
        z = z - jnp.mean(z, axis=0)
    return jnp.mean(u, axis=0) + gamma * jnp.asarray(scale, dtype=u.dtype) * z


def respread_schedule(gamma0: float = 1.0, every: int = 1, half_life: float | None = None):
    """γ(n) for the (R) variants: re-spread before steps n > 0 with n % every == 0.

    γ(n) = γ0 · 2^{−n / half_life} (constant when ``half_life`` is None) on those steps,
    0 (no re-spread) on the others; the initial ensemble (n = 0) is never re-spread. The
    returned callable works on traced integers.

    Kovachki & Stuart describe the "expanding ensemble" u^(j) ← ū + ξ, ξ ~ γ(n) μ0
    without fixing γ(n). Our default (:func:`eki_infer.ml.fit_pytree`, the benchmark) is
    γ = 1 at the start of every epoch after the first: each epoch starts from the
    current mean with the initial spread, so the ensemble never stays collapsed (its
    steps are about h × its spread) and the final ensemble has had a whole epoch of
    updates since the last re-spread. A decaying γ (``half_life`` in steps) is
    available; on digits it was no better than the constant.
    """
    check_number("gamma0", gamma0, positive=True)
    check_count("every", every)
    every = int(every)
    if half_life is not None:
        check_number("half_life", half_life, positive=True)

    def gamma(n):
        n = jnp.asarray(n)
        value = jnp.asarray(gamma0, dtype=float)
        if half_life is not None:
            value = value * 2.0 ** (-n.astype(float) / half_life)
        return jnp.where((n > 0) & (n % every == 0), value, 0.0)

    gamma.gamma0, gamma.every, gamma.half_life = gamma0, every, half_life
    return gamma


# ----------------------------------------------------------------------- the kernel


class EKIMLState(NamedTuple):
    """State of the EKI optimiser.

    Attributes:
        particles: u_n, shape ``(J, d)``.
        previous: u_{n−1} (for momentum; equal to u_0 at n = 0 and to the re-spread
            ensemble right after a re-spread), shape ``(J, d)``.
        iteration: n, an integer scalar.
        momentum_iteration: steps since the start or the last re-spread: the k in the
            Nesterov coefficient λ_k = (k − 1)/(k + 2).
    """

    particles: jax.Array
    previous: jax.Array
    iteration: jax.Array
    momentum_iteration: jax.Array


class EKIMLInfo(NamedTuple):
    """Diagnostics of one step.

    Attributes:
        losses: Ψ(G(v^(j)), y) on the batch at the evaluated points, shape ``(J,)``.
        step_size: h_n.
        d_norm: ‖D(v_n)‖_F.
        gamma: the re-spreading γ(n) applied before the step (0: none).
    """

    losses: jax.Array
    step_size: jax.Array
    d_norm: jax.Array
    gamma: jax.Array


class EKIMLKernel(NamedTuple):
    """``init(particles) -> state`` and
    ``step(rng_key, state, forward, x, y) -> (state, info)``, where
    ``forward(particles (J, d), x)`` returns the outputs of all members on ``x`` (an
    array or PyTree with a leading J axis). Both are pure and jit-able (``forward`` is a
    static Python callable)."""

    init: Callable
    step: Callable


def eki_ml(
    loss,
    *,
    h: float = DEFAULT_H,
    eps: float = DEFAULT_EPS,
    momentum=None,
    respread: Callable | None = None,
    prior_scale=1.0,
    center: bool = True,
    form: str = "explicit",
    adaptive: bool = True,
) -> EKIMLKernel:
    """Loss-general EKI as an optimiser kernel (Optax/BlackJAX style).

    Args:
        loss: Ψ(z, y) for one member (callable or a name in
            :data:`eki_infer.ml.losses.LOSSES`).
        h: step parameter of h_n = h / (‖D‖_F + ε). Since each member then moves by at
            most about h times the ensemble spread, h = 1 is a natural scale (default).
        eps: ε (default 1e-8; it only guards against D = 0).
        momentum: ``None``, ``"nesterov"`` (λ_n = (n−1)/(n+2)) or a constant λ ∈ [0, 1).
            Without re-spreading (which restarts it) momentum can make the ensemble
            spread grow without bound on small networks; lower ``h`` if it does.
        respread: ``None`` or a schedule n ↦ γ(n) (:func:`respread_schedule`); γ(n) > 0
            re-spreads the ensemble before step n.
        prior_scale: s of μ0 = N(0, diag s²) for re-spreading (scalar or ``(d,)``).
        center: centre the re-spreading draws (keeps ū exactly).
        form: ``"explicit"`` or ``"kalman"`` (see :func:`loss_eki_update`).
        adaptive: normalise the step by ‖D‖_F (default) or use h_n = h.
    """
    loss = get_loss(loss)
    if form not in ("explicit", "kalman"):
        raise ValueError(f"form must be 'explicit' or 'kalman', got {form!r}.")
    if momentum is not None and momentum != "nesterov":
        number = np.ndim(momentum) == 0 and np.issubdtype(np.asarray(momentum).dtype, np.number)
        if not (number and 0.0 <= float(momentum) < 1.0):
            raise ValueError(f"momentum must be None, 'nesterov' or in [0, 1), got {momentum!r}.")
    check_number("h", h, positive=True)
    check_number("eps", eps, positive=False)
    if respread is not None and not callable(respread):
        raise TypeError(
            "respread must be None or a schedule n -> γ(n) such as respread_schedule(1.0), "
            f"got {type(respread).__name__} {respread!r}."
        )
    scale = np.asarray(prior_scale, dtype=float)
    if not (np.all(np.isfinite(scale)) and np.all(scale >= 0)):
        raise ValueError(
            "prior_scale must be non-negative (scalar or per coordinate; 0 freezes a "
            f"coordinate), got {prior_scale!r}."
        )

    def init(particles):
        particles = jnp.asarray(particles)
        if particles.ndim != 2 or particles.shape[0] < 2:
            raise ValueError(f"particles must have shape (J >= 2, d), got {particles.shape}.")
        zero = jnp.zeros((), dtype=jnp.int32)
        return EKIMLState(particles, particles, zero, zero)

    def step(rng_key, state, forward, x, y):
        u, prev, n, k = state
        gamma = jnp.asarray(0.0, dtype=u.dtype)
        if respread is not None:
            gamma = jnp.asarray(respread(n), dtype=u.dtype)

            def spread(operands):
                u, _, k = operands
                new = apply_respread(rng_key, u, gamma, prior_scale, center=center)
                # A re-spread restarts the momentum: zero velocity, λ counter back to 0.
                return new, new, jnp.zeros_like(k)

            u, prev, k = jax.lax.cond(gamma > 0, spread, lambda ops: ops, (u, prev, k))
        v = momentum_point(u, prev, k, momentum)
        outputs = forward(v, x)
        losses = member_losses(loss, outputs, y)
        new, info = loss_eki_update(v, outputs, y, loss, h, eps=eps, adaptive=adaptive, form=form)
        return EKIMLState(new, u, n + 1, k + 1), EKIMLInfo(
            losses, info.step_size, info.d_norm, gamma
        )

    return EKIMLKernel(init, step)


# ---------------------------------------------------------------------------- training


def batch_indices(rng_key, num_examples: int, batch_size: int):
    """A fresh random permutation of the examples cut into ``(num_batches, batch_size)``
    (the last incomplete batch is dropped; ``batch_size ≥ num_examples`` gives one
    full batch)."""
    batch_size = min(int(batch_size), int(num_examples))
    num_batches = num_examples // batch_size
    perm = jax.random.permutation(rng_key, num_examples)
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size)


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


@functools.lru_cache(maxsize=16)
def _epoch_runner(kernel, forward, num_examples, batch_size):
    """One jitted epoch (a fresh permutation, one kernel step per batch in a
    ``lax.scan``), cached so that repeated :func:`fit` calls with the same kernel and
    forward map compile once."""

    @jax.jit
    def run_epoch(key, state, x, y):
        k_perm, k_steps = jax.random.split(key)
        idx = batch_indices(k_perm, num_examples, batch_size)
        keys = jax.random.split(k_steps, idx.shape[0])

        def body(state, inputs):
            key, i = inputs
            state, info = kernel.step(key, state, forward, _take(x, i), _take(y, i))
            return state, (jnp.mean(info.losses), info.step_size)

        state, (losses, steps) = jax.lax.scan(body, state, (keys, idx))
        return state, jnp.mean(losses), jnp.mean(steps)

    return run_epoch


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        state: the final :class:`EKIMLState`.
        history: dict of per-epoch lists: ``"loss"`` (mean over steps and members of the
            batch loss), ``"step_size"`` (mean h_n), ``"wall_time"`` (cumulative
            training seconds, excluding ``on_epoch``; including compilation unless this
            kernel and forward map were compiled by an earlier call with the same data
            shapes),
            ``"forward_evaluations"`` (cumulative per-example member evaluations:
            J × examples seen), and whatever
            ``on_epoch`` returned.
    """

    state: EKIMLState
    history: dict


def fit(
    rng_key,
    kernel: EKIMLKernel,
    forward: Callable,
    particles,
    x,
    y,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    on_epoch: Callable | None = None,
    state: EKIMLState | None = None,
) -> FitResult:
    """Trains an ensemble with mini-batches drawn fresh every step.

    Each epoch draws a new permutation of the training set and takes one kernel step per
    batch, the whole epoch in one jitted ``lax.scan``.

    Args:
        rng_key: PRNG key.
        kernel: an :class:`EKIMLKernel` (:func:`eki_ml`).
        forward: ``forward(particles (J, d), x_batch)`` → outputs with a leading J axis.
        particles: the initial ensemble ``(J, d)`` (ignored when ``state`` is given).
        x, y: training inputs and targets (arrays or PyTrees with a leading example axis).
        epochs: number of passes over the training data.
        batch_size: examples per step.
        on_epoch: optional ``on_epoch(epoch, state) -> dict`` (e.g. test accuracy);
            its values are appended to the history.
        state: resume from this state (a previous call's ``result.state``): with the same
            key, data and batch size the epochs continue the earlier call's random
            stream (batch orders, re-spreading draws), so two calls of 2 epochs equal one
            of 4; ``forward_evaluations`` counts on from there, ``wall_time`` is this
            call's.

    Raises:
        ValueError: for counts that are not positive integers, inputs and targets of
            different lengths, non-finite data, or (FloatingPointError) a loss or
            ensemble that becomes non-finite during training, naming the epoch.
    """
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    n = check_training_data(x, y)
    if state is None:
        state = kernel.init(particles)
    num_members = state.particles.shape[0]
    run_epoch = _epoch_runner(kernel, forward, n, int(batch_size))
    steps_per_epoch = n // min(int(batch_size), n)
    done = int(state.iteration) // steps_per_epoch  # epochs an earlier call ran

    history: dict[str, list] = {
        "loss": [],
        "step_size": [],
        "wall_time": [],
        "forward_evaluations": [],
    }
    seen = steps_per_epoch * min(batch_size, n)
    elapsed = 0.0
    for epoch in range(int(epochs)):
        start = time.perf_counter()
        state, loss, step = run_epoch(jax.random.fold_in(rng_key, done + epoch), state, x, y)
        state = jax.block_until_ready(state)
        elapsed += time.perf_counter() - start
        if not (np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(state.particles)))):
            raise FloatingPointError(
                f"EKI training became non-finite in epoch {done + epoch} (mean batch loss "
                f"{float(loss)}): the forward map or the loss returned NaN/inf for some "
                "member, and the ensemble update mixes every member's output, so one such "
                "member spoils them all. Check the model's outputs and the loss (e.g. "
                "cross_entropy needs probabilities; cross_entropy_logits takes logits), or "
                "lower h or drop the momentum if the ensemble diverged."
            )
        history["loss"].append(float(loss))
        history["step_size"].append(float(step))
        history["wall_time"].append(elapsed)
        history["forward_evaluations"].append((done + epoch + 1) * seen * num_members)
        if on_epoch is not None:
            for k, val in (on_epoch(epoch, state) or {}).items():
                history.setdefault(k, []).append(val)
    return FitResult(state, history)


def check_training_data(x, y) -> int:
    """The number of examples, after checking that every leaf of ``x`` and ``y`` has it
    as its leading axis and that their floating-point entries are finite (a NaN in one
    example would turn the whole ensemble's update into NaN)."""
    lengths = {
        f"{name}{jax.tree_util.keystr(path)}": (jnp.shape(leaf)[:1] or (None,))[0]
        for name, tree in (("x", x), ("y", y))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    if not lengths:
        raise ValueError("x and y hold no arrays.")
    if len(set(lengths.values())) != 1:
        raise ValueError(
            "x and y must have the same number of examples along their first axis, got "
            + ", ".join(f"{k}: {v}" for k, v in lengths.items())
            + "."
        )
    count = next(iter(lengths.values()))
    if count is None or count == 0:
        raise ValueError(
            "x and y hold no examples (their leading axis, the examples', has length "
            f"{count if count is not None else 'none: scalars'})."
        )
    for name, tree in (("x", x), ("y", y)):
        for leaf in inexact_leaves(tree):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                raise ValueError(f"{name} contains NaN or inf: drop or impute those examples.")
    return int(count)


# ------------------------------------------------------------------------- predictions


def best_particle(loss, forward, particles, x, y):
    """Index j* of the member with the lowest loss Ψ(G(u^(j) | x), y)."""
    return jnp.argmin(member_losses(loss, forward(particles, x), y))


def predict(forward, particles, x, which="mean"):
    """Outputs of the mean particle ū (``"mean"``), of member ``which`` (an int, e.g.
    :func:`best_particle`), or of all members (``"all"``)."""
    particles = jnp.asarray(particles)
    if isinstance(which, str) and which == "all":
        return forward(particles, x)
    if isinstance(which, str) and which == "mean":
        point = jnp.mean(particles, axis=0)
    elif isinstance(which, str):
        raise ValueError(f"which must be 'mean', 'all' or a member index, got {which!r}.")
    else:
        if isinstance(which, int | np.integer) and not -len(particles) <= which < len(particles):
            raise ValueError(
                f"which={which} is not a member index: the ensemble has {particles.shape[0]} "
                "members."
            )
        point = particles[which]  # a traced index (under jit) is not range-checked
    return jax.tree_util.tree_map(lambda a: a[0], forward(point[None, :], x))


# ------------------------------------------------------------------------------ online


class OnlineEKI:
    """Streaming EKI: one update from each new batch as it arrives.

    ``update(x, y)`` first scores the current mean particle on the new batch (the
    prequential, "first-pass" loss: a prediction made before the data were used), then
    takes one kernel step on it. ``update_many`` runs a whole stream in one jitted scan.

    Args:
        kernel: an :class:`EKIMLKernel`.
        forward: ``forward(particles, x)`` as in :func:`fit`.
        particles: the initial ensemble ``(J, d)``.
        rng_key: PRNG key for re-spreading draws.
        score: the loss ``score(z, y)`` of the prequential score on one batch, e.g. the
            mean squared error (need not be the loss the kernel trains with).
    """

    def __init__(self, kernel: EKIMLKernel, forward: Callable, particles, rng_key, score):
        self.kernel = kernel
        self.forward = forward
        self.score = get_loss(score)
        self.state = kernel.init(particles)
        self.rng_key = rng_key
        self.count = 0

        def one(state, inputs):
            key, xb, yb = inputs
            mean = jnp.mean(state.particles, axis=0)
            out = jax.tree_util.tree_map(lambda a: a[0], forward(mean[None, :], xb))
            before = self.score(out, yb)
            state, info = kernel.step(key, state, forward, xb, yb)
            return state, (before, jnp.mean(info.losses))

        self._one = jax.jit(one)
        self._many = jax.jit(lambda state, inputs: jax.lax.scan(one, state, inputs))

    @property
    def particles(self):
        return self.state.particles

    def update(self, x, y):
        """One step on a new batch; returns the mean particle's loss on it *before* the
        update. The batch is checked as :meth:`update_many`'s stream is (lengths, no
        examples, NaN); a step that leaves the ensemble non-finite raises
        ``FloatingPointError`` and keeps the state from before it."""
        check_training_data(x, y)
        key = jax.random.fold_in(self.rng_key, self.count)
        state, (before, _) = self._one(self.state, (key, x, y))
        if not bool(jnp.all(jnp.isfinite(state.particles))):
            raise FloatingPointError(
                f"OnlineEKI update {self.count} made the ensemble non-finite (the loss on "
                f"this batch before it: {float(before):.3g}); the state from before it is "
                "kept. Check the forward map and the loss on this batch, or lower h."
            )
        self.state = state
        self.count += 1
        return float(before)

    def update_many(self, xs, ys):
        """Steps through a stream of batches (leading axis: time); returns the
        prequential losses, shape ``(T,)``."""
        num = check_training_data(xs, ys)
        keys = jax.vmap(lambda i: jax.random.fold_in(self.rng_key, i))(
            jnp.arange(self.count, self.count + num)
        )
        self.state, (before, _) = self._many(self.state, (keys, xs, ys))
        self.count += num
        return np.asarray(before)

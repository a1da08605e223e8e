"""The ensemble-process type and the ensemble algebra shared by EKI, EKS and UKI.

A process is a small bundle of pure functions (in the style of Optax's
``GradientTransformation`` and BlackJAX's kernels) over a NamedTuple state:

- ``init(rng_key, dim) -> state``: the initial ensemble (or Gaussian) from the prior
  N(0, I_d) of whitened parameter space u;
- ``points(state) -> (P, d)``: where the forward map must be evaluated this iteration
  (the ensemble members, or UKI's sigma points);
- ``update(rng_key, state, outputs, failed, observations, noise, dt) -> state``: one
  step of size ``dt`` given the forward-map outputs ``(P, M)`` at ``points(state)``;
- ``samples(rng_key, state, num_samples) -> (N, d)``: posterior draws in u-space.

All of them are jit-able with the process as a closure and vmap-able over a leading
chain axis of ``(rng_key, state, outputs, failed, dt)``.

Conventions used by every update (stated once here):

- **Rows are members.** Ensembles are ``(J, d)`` arrays, outputs ``(J, M)``.
- **Whitened output space.** Outputs and data are mapped through ``noise.whiten``
  (W with WᵀW = Γ⁻¹), after which the observation noise is the identity, so scalar,
  diagonal, dense, low-rank and block Γ all go through the same code.
- **One covariance normalisation: 1/n**, n the number of successful members
  (n = J without failures), as in the reference Julia code (``corrected = false``).
  Anomaly matrices are X = (u − ū)/√n and Y = (g̃ − ḡ̃)/√n (failed rows zero), so
  C^{uu} = XᵀX, C^{uG} = XᵀY and C^{GG} = YᵀY. ALGORITHMS.md writes the transform
  variant with 1/(J−1); that variant is exact for whichever normalisation is used
  consistently for both the anomalies and the rescaling, and here it is 1/n.
- **Ensemble-space algebra.** The Kalman gain is applied through the push-through
  identity C^{uG}(C^{GG} + I/Δt)⁻¹ r = Xᵀ (I_J + Δt Y Yᵀ)⁻¹ Y (Δt r), with a Cholesky
  solve of size min(J, M) (the M × M form I_M + Δt YᵀY is used when M < J); the
  matrices to factor have eigenvalues ≥ 1, and Δt multiplies rather than divides, so
  Δt = 0 is harmless. Neither a dense M × M nor a d × d matrix is formed when the
  ensemble-space form is the smaller one.
- **Failures.** A member fails when the caller marks it or when any of its outputs is
  NaN/inf. Failed rows are replaced (``jnp.where``) before any arithmetic, carry
  weight zero in every mean and covariance, and after the update are redrawn from the
  Gaussian fitted to the updated successful members (:func:`redraw_failed`).
- **Δt = 0 is a no-op.** Every update returns its input state unchanged (bit for bit)
  unless Δt > 0 (:func:`keep_if_moved`); a NaN Δt also leaves the state unchanged. This
  lets finished chains, vmapped beside running ones, stand still.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

__all__ = [
    "EnsembleFailureError",
    "EnsembleProcess",
    "EnsembleState",
    "anomalies",
    "centred_weights",
    "check_ensemble_size",
    "check_failures",
    "detect_failures",
    "ensemble_process",
    "ensemble_weights",
    "implicit_solve",
    "kalman_increments",
    "keep_if_moved",
    "masked_mean",
    "psd_sqrt",
    "redraw_failed",
    "whiten_outputs",
]


class EnsembleProcess(NamedTuple):
    """An ensemble Kalman method as a bundle of pure functions.

    Attributes:
        name: ``"eki"``, ``"eks"`` or ``"uki"``.
        init: ``init(rng_key, dim) -> state``, the initial state from the prior N(0, I_d).
        points: ``points(state) -> (P, d)``, where to evaluate the forward map.
        update: ``update(rng_key, state, outputs (P, M), failed (P,), observations (M,),
            noise, dt) -> state``, one step of size ``dt`` (``dt = 0`` changes nothing).
        samples: ``samples(rng_key, state, num_samples) -> (N, d)``, posterior draws in
            u-space (EKI/EKS: the ensemble itself, ignoring ``num_samples``).
    """

    name: str
    init: Callable
    points: Callable
    update: Callable
    samples: Callable


def ensemble_process(name: str, ensemble_size: int, step: Callable) -> EnsembleProcess:
    """An :class:`EnsembleProcess` whose state is the ensemble itself (EKI, EKS).

    ``step(rng_key, u, outputs, observations, noise, dt, failed) -> u`` is the update of
    the (J, d) ensemble; the initial ensemble is J draws from N(0, I_d) and the posterior
    samples are the current members.
    """

    def init(rng_key, dim):
        return EnsembleState(jax.random.normal(rng_key, (ensemble_size, int(dim))))

    def points(state):
        return state.particles

    def update(rng_key, state, outputs, failed, observations, noise, dt):
        return EnsembleState(
            step(rng_key, state.particles, outputs, observations, noise, dt, failed)
        )

    def samples(rng_key, state, num_samples=None):
        del rng_key, num_samples
        return state.particles

    return EnsembleProcess(name, init, points, update, samples)


class EnsembleState(NamedTuple):
    """State of the particle methods (EKI and EKS).

    Attributes:
        particles: the ensemble in whitened parameter space, shape ``(J, d)``.
    """

    particles: jax.Array


class EnsembleFailureError(RuntimeError):
    """Raised when too few ensemble members (or sigma points) returned finite outputs."""


class EnsembleDivergenceError(EnsembleFailureError):
    """Raised when an ensemble's mean data misfit has grown far beyond the prior
    ensemble's: the steps are unstable for the process (EKS's explicit drift under a
    data-misfit controller, say), and what follows is overflow, not inference."""


#: a mean misfit this many times the prior ensemble's (or the data size, if larger) is
#: divergence: a stable process moves from the prior ensemble towards the data. On the
#: six reference models (data seeds 0-2, EKI, EKS and UKI with their default schedulers)
#: the largest ratio over a run was 1.94 (EKS on eight schools); EKS under the
#: data-misfit controller on a 6-datum linear problem passed it by iteration 4
#: (``benchmarks/divergence_margin.py``)
DIVERGENCE_FACTOR = 1000.0


# --------------------------------------------------------------------------- failures


def detect_failures(outputs, failed=None):
    """Failed rows: those marked in ``failed`` and those with any non-finite output.

    Args:
        outputs: forward-map outputs, shape ``(..., P, M)``.
        failed: optional boolean flags, shape ``(..., P)``.

    Returns:
        Boolean array of shape ``(..., P)``, True where the row failed.
    """
    bad = ~jnp.all(jnp.isfinite(outputs), axis=-1)
    if failed is not None:
        bad = bad | jnp.asarray(failed, dtype=bool)
    return bad


def check_failures(
    failed, iteration, min_successes: int = 2, chain_ids=None, points: str = "ensemble members"
):
    """Raise :class:`EnsembleFailureError` when fewer than ``min_successes`` succeeded.

    A host-side (Python) check for the driver, to be called after the forward map has
    been evaluated and before the update.

    Args:
        failed: boolean flags, shape ``(P,)`` or ``(chains, P)``.
        iteration: the iteration number, used in the message.
        min_successes: the fewest successful members an update can use (default 2).
        chain_ids: the chains' numbers for the message (default: their positions).
        points: what the flags are, for the message (UKI: "sigma points").

    Returns:
        The number of failed members (an int, or an int array per chain).
    """
    failed = np.asarray(failed, dtype=bool)
    if failed.ndim == 0:
        raise ValueError("check_failures expects flags of shape (P,) or (chains, P).")
    total = failed.shape[-1]
    n_failed = failed.sum(axis=-1)
    n_ok = total - n_failed
    if np.any(n_ok < min_successes):
        if failed.ndim == 1:
            where = ""
        else:
            chains = np.flatnonzero(np.reshape(n_ok < min_successes, -1))
            if chain_ids is not None:
                chains = np.asarray(chain_ids)[chains]
            where = f" in chain(s) {', '.join(str(c) for c in chains)}"
        worst = int(np.min(n_ok))
        raise EnsembleFailureError(
            f"Iteration {iteration}: only {worst} of {total} {points} returned "
            f"finite forward-map outputs{where} ({total - worst} failed); at least "
            f"{min_successes} successful {points} are needed to update the ensemble. "
            "Check the forward map for NaN/inf outputs in the region the ensemble explores."
        )
    return n_failed if failed.ndim > 1 else int(n_failed)


def check_divergence(misfit_means, data_dim: int, iteration: int, active, chain_ids=None, hint=""):
    """Raises :class:`EnsembleDivergenceError` for active chains whose latest mean misfit
    exceeds ``DIVERGENCE_FACTOR`` × max(the first iteration's, the data size M).

    Args:
        misfit_means: the recorded mean misfits, one ``(chains,)`` row per iteration.
        data_dim: M, the number of data (a converged ensemble's misfit is about M/2).
        iteration: the iteration number, used in the message.
        active: ``(chains,)`` flags of the chains to check (those still running).
        chain_ids: the chains' numbers for the message (default: their positions).
        hint: what to do about it, appended to the message.
    """
    if len(misfit_means) < 2:
        return
    first, last = np.asarray(misfit_means[0]), np.asarray(misfit_means[-1])
    limit = DIVERGENCE_FACTOR * np.maximum(first, data_dim)
    diverged = np.flatnonzero(np.asarray(active) & (last > limit))
    if diverged.size == 0:
        return
    names = np.arange(len(last)) if chain_ids is None else np.asarray(chain_ids)
    worst = diverged[np.argmax(last[diverged] / limit[diverged])]
    raise EnsembleDivergenceError(
        f"Iteration {iteration}: the ensemble diverged in chain(s) "
        f"{', '.join(str(int(names[c])) for c in diverged)}: its mean data misfit grew to "
        f"{last[worst]:.3g} (chain {int(names[worst])}), against {first[worst]:.3g} for the "
        f"prior ensemble; beyond {DIVERGENCE_FACTOR:g} × max(that, M = {data_dim}) the "
        f"update is unstable and what follows is overflow, not inference.{hint}"
    )


def check_ensemble_size(ensemble_size) -> int:
    """Validates an ensemble size (an integer ≥ 2) and returns it as an int."""
    if isinstance(ensemble_size, bool) or int(ensemble_size) != ensemble_size:
        raise ValueError(f"ensemble_size must be an integer, got {ensemble_size!r}.")
    if ensemble_size < 2:
        raise ValueError(f"ensemble_size must be at least 2, got {ensemble_size}.")
    return int(ensemble_size)


# ------------------------------------------------------------------ ensemble statistics


def masked_mean(x, ok):
    """Mean of the rows of ``x`` (``(J, n)``) where ``ok`` (``(J,)``) is True.

    Rows that are not ok are replaced by zeros before summing, so NaN rows do no harm.
    """
    count = jnp.maximum(jnp.sum(ok), 1).astype(x.dtype)
    return jnp.sum(jnp.where(ok[:, None], x, 0.0), axis=0) / count


def anomalies(x, ok):
    """Masked mean and scaled anomalies of an ensemble (1/n normalisation).

    Args:
        x: ensemble, shape ``(J, n)``.
        ok: successful rows, shape ``(J,)``.

    Returns:
        ``(mean, A, count)``: the mean over ok rows ``(n,)``; ``A = (x − mean)/√count``
        on ok rows and zero elsewhere ``(J, n)``, so that ``AᵀA`` is the covariance;
        and ``count`` (a float scalar).
    """
    count = jnp.maximum(jnp.sum(ok), 1).astype(x.dtype)
    mean = jnp.sum(jnp.where(ok[:, None], x, 0.0), axis=0) / count
    a = jnp.where(ok[:, None], x - mean, 0.0) / jnp.sqrt(count)
    return mean, a, count


def whiten_outputs(outputs, ok, observations, noise):
    """Whitened outputs and data: (W g with failed rows set to W y, W y)."""
    safe = jnp.where(ok[:, None], outputs, observations)
    return noise.whiten(safe), noise.whiten(observations)


# ------------------------------------------------------------------------ linear algebra


def _eye(n, dtype):
    return jnp.eye(n, dtype=dtype)


def ensemble_weights(y, dt, v):
    """Ensemble-space weights ``H = V Yᵀ (I_J + Δt Y Yᵀ)⁻¹``, shape ``(K, J)``.

    With anomalies X (``(J, d)``) the Kalman increments are ``H @ X``: row k is
    C^{uG} (C^{GG} + I/Δt)⁻¹ (v_k/Δt), i.e. pass ``V = Δt × innovations``. The solve is
    of size min(J, M): when M < J the push-through form ``V (I_M + Δt YᵀY)⁻¹ Yᵀ`` is used.

    Args:
        y: whitened output anomalies, shape ``(J, M)``.
        dt: step size (scalar).
        v: Δt-scaled innovations, shape ``(K, M)``.
    """
    j, m = y.shape
    if j <= m:
        s = _eye(j, y.dtype) + dt * (y @ y.T)
        chol = jnp.linalg.cholesky(s)
        return cho_solve((chol, True), y @ v.T).T
    return _push_through(y, dt, v) @ y.T


def _push_through(y, dt, v):
    """``V (I_M + Δt YᵀY)⁻¹``, shape ``(K, M)``: the M × M side of the Kalman weights."""
    m = y.shape[1]
    chol = jnp.linalg.cholesky(_eye(m, y.dtype) + dt * (y.T @ y))
    return cho_solve((chol, True), v.T).T


def centred_weights(h, ok, count):
    """``H C`` with ``C = diag(ok)(I − 1 okᵀ/n)/√n``, so that ``(H C) @ u == H @ A`` for the
    scaled anomalies A of ``u`` (:func:`anomalies`).

    Folding the centring into the J × J weights lets an update touch the (J, d)
    ensemble once (``u + (H C) @ u``) instead of forming the anomaly matrix first: half
    the passes over the parameters when d ≫ M.
    """
    hm = jnp.where(ok[None, :], h, 0.0)
    return (hm - jnp.sum(hm, axis=1, keepdims=True) * (ok / count)[None, :]) / jnp.sqrt(count)


def kalman_increments(y, dt, v, u, ok, count):
    """Rows ``H A`` of the Kalman increments, ``H = V Yᵀ (I_J + Δt Y Yᵀ)⁻¹`` and A the
    scaled anomalies of ``u`` (``(J, d)``) over the ``ok`` rows, shape ``(K, d)``.

    When J ≤ M the J × J weights are formed once with the centring folded in
    (:func:`centred_weights`), so the ensemble is touched in one pass. When J > M the
    push-through form ``V (I_M + Δt YᵀY)⁻¹ (Yᵀ A)`` needs only M × M and M × d products:
    O(J M (M + d)) work instead of the J × J weights' O(J² (M + d)).
    """
    j, m = y.shape
    if j <= m:
        return centred_weights(ensemble_weights(y, dt, v), ok, count) @ u
    _, a, _ = anomalies(u, ok)
    return _push_through(y, dt, v) @ (y.T @ a)


def implicit_solve(x, dt, rhs):
    """Rows of ``(I_d + Δt XᵀX)⁻¹ r`` for each row r of ``rhs`` (``(K, d)``).

    ``X`` (``(J, d)``) holds scaled anomalies so ``XᵀX`` is the ensemble covariance. For
    d ≤ J the d × d system is factored directly; for d > J the Woodbury identity
    ``(I + Δt XᵀX)⁻¹ = I − Δt Xᵀ (I_J + Δt X Xᵀ)⁻¹ X`` keeps every solve J × J.
    """
    j, d = x.shape
    if d <= j:
        a = _eye(d, x.dtype) + dt * (x.T @ x)
        chol = jnp.linalg.cholesky(a)
        return cho_solve((chol, True), rhs.T).T
    s = _eye(j, x.dtype) + dt * (x @ x.T)
    chol = jnp.linalg.cholesky(s)
    z = cho_solve((chol, True), x @ rhs.T)  # (J, K)
    return rhs - dt * (z.T @ x)


def _eigh_sqrt(cov):
    """V diag(√max(λ, 0)) from the eigendecomposition of the symmetrised ``cov``."""
    w, v = jnp.linalg.eigh(0.5 * (cov + cov.T))
    return v * jnp.sqrt(jnp.clip(w, 0.0))[None, :]


@jax.custom_batching.custom_vmap
def psd_sqrt(cov):
    """A square root L with L Lᵀ = cov: the Cholesky factor, or, when that fails (a
    singular or slightly indefinite matrix), V diag(√max(λ, 0)) from the eigendecomposition.

    Under ``vmap`` (the driver's chains) a per-matrix ``cond`` would become a select that
    computes the eigendecomposition for every matrix at every step (about 10× the
    Cholesky's cost at d = 600); the batching rule below asks once for the whole batch
    instead, so the eigendecomposition runs only when some factor failed.
    """
    chol = jnp.linalg.cholesky(cov)
    failed = ~jnp.all(jnp.isfinite(chol))
    return jax.lax.cond(failed, lambda _: _eigh_sqrt(cov), lambda _: chol, None)


@psd_sqrt.def_vmap
def _psd_sqrt_batched(axis_size, in_batched, cov):
    (batched,) = in_batched
    if not batched:
        return psd_sqrt(cov), False
    chol = jnp.linalg.cholesky(cov)
    ok = jnp.all(jnp.isfinite(chol), axis=(-2, -1))

    def repair(_):
        return jnp.where(ok[:, None, None], chol, jax.vmap(_eigh_sqrt)(cov))

    return jax.lax.cond(jnp.all(ok), lambda _: chol, repair, None), True


# ------------------------------------------------------------------- shared operations


def redraw_failed(rng_key, x, ok):
    """Replace the rows of ``x`` that are not ``ok`` by draws from the Gaussian fitted to
    the ok rows (ALGORITHMS.md §6), in ensemble form without any d × d matrix.

    Draws are ``mean + ζ R`` with ζ ~ N(0, I_k), k = min(J, d), and R the triangular
    factor of the QR decomposition A = QR of the ok rows' scaled anomalies A (covariance
    AᵀA = RᵀR, the package's 1/n normalisation): O(J d k) work and no J × J matrix,
    which matters because under ``vmap`` over chains the skip below becomes a select and
    the redraw runs at every step. When the fitted covariance is
    certainly singular (n − 1 < d) an isotropic jitter of variance
    ``max_i C_ii · √eps`` is added — a cheap stand-in for ``eigmax · √eps`` that needs no
    eigendecomposition. When no row failed, ``x`` is returned unchanged.
    """
    j, d = x.shape

    def redraw(x):
        mean, a, count = anomalies(x, ok)
        k_mix, k_jit = jax.random.split(rng_key)
        r = jnp.linalg.qr(a, mode="r")  # (min(J, d), d) with RᵀR = AᵀA
        draws = mean + jax.random.normal(k_mix, (j, r.shape[0]), dtype=x.dtype) @ r
        var_max = jnp.max(jnp.sum(a * a, axis=0))
        jitter = jnp.where(count - 1 < d, jnp.sqrt(var_max * jnp.sqrt(jnp.finfo(x.dtype).eps)), 0.0)
        draws = draws + jitter * jax.random.normal(k_jit, (j, d), dtype=x.dtype)
        return jnp.where(ok[:, None], x, draws)

    return jax.lax.cond(jnp.all(ok), lambda x: x, redraw, x)


def keep_if_moved(dt, new, old):
    """``new`` where ``dt > 0``, else ``old`` (leaf by leaf): Δt = 0 (or NaN) is a no-op."""
    moved = jnp.asarray(dt) > 0
    return jax.tree_util.tree_map(lambda a, b: jnp.where(moved, a, b), new, old)

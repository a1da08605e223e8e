"""Step-size schedulers: turn the current whitened residuals into the next Δt.

A scheduler is a frozen dataclass (hashable, so usable as a static ``jit`` argument)
with two methods:

- ``init() -> SchedulerState``;
- ``next(state, whitened_residuals, valid) -> (dt, new_state)``, where
  ``whitened_residuals = W (G(u) − y)`` has shape ``(P, M)`` (one row per ensemble
  member or sigma point) and ``valid`` ``(P,)`` flags the successful rows. Invalid or
  non-finite rows are masked out before any arithmetic. ``next`` is jit-able and
  vmap-able over a leading chain axis of ``(state, whitened_residuals, valid)``.

Contract with the driver:

- ``new_state.done`` True means the returned Δt is the **last** step: apply it, then
  stop. Only :class:`DataMisfitController` in ``"stop"`` mode ever finishes.
- Once ``state.done`` is True, ``next`` returns Δt = 0 and the state unchanged, so a
  finished chain vmapped beside running ones stands still (every process update is a
  no-op at Δt = 0).
- A degenerate step — NaN, infinite or non-positive, e.g. all members failed, all
  misfits zero, or a zero misfit variance — is returned as Δt = NaN with ``t``
  unchanged; the driver must check ``isfinite(dt)`` and raise an error naming the
  iteration. (Process updates also leave the state unchanged at Δt = NaN.)

Schedulers (ALGORITHMS.md §2–3):

- :class:`DataMisfitController` (Iglesias & Yang 2021), the default for EKI and UKI:
  Φ_j = ½‖r_j‖², q = max(M/(2⟨Φ⟩), √(M/(2 Var Φ))) over the valid rows (Var with
  1/(n − 1)), Δt = min(q, T − t); the step that reaches T sets t = T exactly, so the
  steps sum to T up to floating-point addition.
- :class:`EKSStableScheduler` (Kovachki & Stuart 2019), the default for EKS:
  Δt = numerator/(‖D‖_F + nugget) with D_jk = 1/n ⟨r_k − r̄, r_j⟩ (n valid rows).
  ‖D‖_F is computed from J × J or M × M Gram matrices, whichever is smaller.
  Measured on a linear-Gaussian problem (d = 2, M = 4, J = 10, ALDI, 12 000 steps, the
  ensembles after burn-in pooled with weights Δt): numerator = 1 inflated the
  posterior variances by about 60 %, 0.3 by 13 %, 0.1 by 2–3 % (within Monte-Carlo
  error) and 0.03 by < 1 %; the bias is the step size's and problem-dependent (on
  another linear problem of that size, Γ = 0.5 I, 0.1 inflated them by about 10 % and
  0.03 by about 3 %). :func:`default_scheduler` therefore gives
  ``numerator = 0.1`` for EKS (the class default stays 1.0, the reference value).
  Because this Δt depends on the ensemble, the ensemble after a fixed number of
  iterations (and an unweighted average over iterations) over-represents small-step
  states: at numerator 0.1 its variances were about 10 % too wide at J = 10 and 1–2 %
  at J = 50. Pool over iterations with weights Δt (a time average) for the unbiased
  equilibrium.
- :class:`DefaultScheduler`: a constant Δt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eki_infer.user_warnings import warn

__all__ = [
    "EKS_DEFAULT_NUMERATOR",
    "DataMisfitController",
    "DefaultScheduler",
    "EKSStableScheduler",
    "Scheduler",
    "SchedulerState",
    "check_scheduler",
    "default_scheduler",
]

ON_TERMINATE = ("stop", "continue", "continue_fixed")

#: The numerator :func:`default_scheduler` uses for EKS (see the module docstring).
EKS_DEFAULT_NUMERATOR = 0.1


class SchedulerState(NamedTuple):
    """State of a scheduler (one per chain).

    Attributes:
        t: the algorithmic time reached, the sum of the steps so far (float scalar).
        dt: the last step returned (NaN before the first).
        iteration: number of steps returned (int32 scalar).
        done: True once the final step has been returned.
    """

    t: jax.Array
    dt: jax.Array
    iteration: jax.Array
    done: jax.Array


def _valid_rows(residuals, valid):
    ok = jnp.asarray(valid, dtype=bool) & jnp.all(jnp.isfinite(residuals), axis=-1)
    return ok, jnp.where(ok[:, None], residuals, 0.0)


class Scheduler:
    """Base class of the schedulers; subclasses implement :meth:`_propose`."""

    def init(self) -> SchedulerState:
        """The state before the first step: t = 0, dt = NaN, iteration 0, not done."""
        zero = jnp.zeros(())  # not weakly typed: later states keep the same types
        return SchedulerState(
            t=zero,
            dt=jnp.full((), jnp.nan, dtype=zero.dtype),
            iteration=jnp.zeros((), dtype=jnp.int32),
            done=jnp.zeros((), dtype=bool),
        )

    def next(self, state: SchedulerState, whitened_residuals, valid):
        """The next step size and the new state (see the module docstring's contract).

        Args:
            state: the current :class:`SchedulerState`.
            whitened_residuals: W (G(u) − y), shape ``(P, M)``.
            valid: successful rows, shape ``(P,)``.

        Returns:
            ``(dt, new_state)``.
        """
        residuals = jnp.asarray(whitened_residuals)
        dt, t_new, done_new = self._propose(state, residuals, valid)
        dt = jnp.asarray(dt, dtype=state.t.dtype)
        finite = jnp.isfinite(dt) & (dt > 0)
        dt = jnp.where(finite, dt, jnp.nan)
        t_new = jnp.where(finite, t_new, state.t)
        done_new = jnp.where(finite, done_new, False)
        finished = state.done
        new = SchedulerState(
            t=jnp.where(finished, state.t, t_new).astype(state.t.dtype),
            dt=jnp.where(finished, state.dt, dt),
            iteration=jnp.where(finished, state.iteration, state.iteration + 1),
            done=finished | done_new,
        )
        return jnp.where(finished, jnp.zeros_like(dt), dt), new

    def _propose(self, state, residuals, valid):  # pragma: no cover - abstract
        """Returns ``(dt, t_new, done_new)`` ignoring ``state.done``."""
        raise NotImplementedError


@dataclass(frozen=True)
class DataMisfitController(Scheduler):
    """The data-misfit controller of Iglesias & Yang (2021).

    Attributes:
        terminate_at: the final time T (> 0, default 1: the posterior for EKI/UKI).
        on_terminate: ``"stop"`` (default: the step reaching T is the last),
            ``"continue"`` (keep using q beyond T) or ``"continue_fixed"`` (repeat the
            last Δt beyond T).
    """

    terminate_at: float = 1.0
    on_terminate: str = "stop"

    def __post_init__(self):
        t = self.terminate_at
        if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t) or t <= 0:
            raise ValueError(
                f"DataMisfitController: terminate_at must be a positive number, got {t!r}."
            )
        object.__setattr__(self, "terminate_at", float(t))
        if self.on_terminate not in ON_TERMINATE:
            raise ValueError(
                f"DataMisfitController: on_terminate must be one of {ON_TERMINATE}, "
                f"got {self.on_terminate!r}."
            )

    def _propose(self, state, residuals, valid):
        ok, r = _valid_rows(residuals, valid)
        n = jnp.sum(ok).astype(r.dtype)
        m = r.shape[-1]
        phi = 0.5 * jnp.sum(r * r, axis=-1)
        phi_mean = jnp.sum(jnp.where(ok, phi, 0.0)) / n
        phi_var = jnp.sum(jnp.where(ok, (phi - phi_mean) ** 2, 0.0)) / (n - 1.0)
        q = jnp.maximum(m / (2.0 * phi_mean), jnp.sqrt(m / (2.0 * phi_var)))
        q = jnp.where((n >= 2) & jnp.isfinite(q) & (q > 0), q, jnp.nan)

        big_t = jnp.asarray(self.terminate_at, dtype=state.t.dtype)
        remaining = big_t - state.t
        before = state.t < big_t
        # The second test catches a q just below T − t whose sum with t rounds to T
        # (float32): without it the state would sit at t = T with done False.
        reaches = (q >= remaining) | (state.t + q >= big_t)
        dt_before = jnp.where(reaches, remaining, q)
        t_before = jnp.where(reaches, big_t, state.t + q)
        if self.on_terminate == "stop":
            return dt_before, t_before, reaches
        dt_after = q if self.on_terminate == "continue" else state.dt
        dt = jnp.where(before, dt_before, dt_after)
        t_new = jnp.where(before, t_before, state.t + dt_after)
        return dt, t_new, jnp.zeros((), dtype=bool)


@dataclass(frozen=True)
class EKSStableScheduler(Scheduler):
    """Δt = numerator / (‖D‖_F + nugget), D_jk = 1/n ⟨r_k − r̄, r_j⟩ (Kovachki & Stuart 2019).

    Attributes:
        numerator: positive numerator (default 1.0 as in the reference code;
            :func:`default_scheduler` uses the measured, less biased 0.1 for EKS).
        nugget: non-negative regulariser of the denominator (default machine epsilon).
    """

    numerator: float = 1.0
    nugget: float = float(jnp.finfo(jnp.float64).eps)

    def __post_init__(self):
        if not _positive_finite(self.numerator):
            raise ValueError(
                f"EKSStableScheduler: numerator must be a positive finite number, "
                f"got {self.numerator!r}."
            )
        if not _finite_number(self.nugget) or self.nugget < 0:
            raise ValueError(
                f"EKSStableScheduler: nugget must be a non-negative finite number, "
                f"got {self.nugget!r}."
            )
        object.__setattr__(self, "numerator", float(self.numerator))
        object.__setattr__(self, "nugget", float(self.nugget))

    def _propose(self, state, residuals, valid):
        ok, r = _valid_rows(residuals, valid)
        n = jnp.sum(ok).astype(r.dtype)
        mean = jnp.sum(r, axis=0) / jnp.maximum(n, 1.0)
        e = jnp.where(ok[:, None], r - mean, 0.0)
        p, m = r.shape
        if p <= m:
            d_mat = (r @ e.T) / n
            norm = jnp.sqrt(jnp.sum(d_mat * d_mat))
        else:  # ‖R Eᵀ‖_F² = trace((RᵀR)(EᵀE)), from two M × M Gram matrices
            norm = jnp.sqrt(jnp.maximum(jnp.sum((r.T @ r) * (e.T @ e)), 0.0)) / n
        dt = self.numerator / (norm + self.nugget)
        dt = jnp.where(n >= 1, dt, jnp.nan)
        return dt, state.t + dt, jnp.zeros((), dtype=bool)


@dataclass(frozen=True)
class DefaultScheduler(Scheduler):
    """A constant step.

    Attributes:
        dt: the step size (positive, default 1.0).
    """

    dt: float = 1.0

    def __post_init__(self):
        if not _positive_finite(self.dt):
            raise ValueError(
                f"DefaultScheduler: dt must be a positive finite number, got {self.dt!r}."
            )
        object.__setattr__(self, "dt", float(self.dt))

    def _propose(self, state, residuals, valid):
        dt = jnp.asarray(self.dt, dtype=state.t.dtype)
        return dt, state.t + dt, jnp.zeros((), dtype=bool)


def _finite_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def _positive_finite(x) -> bool:
    return _finite_number(x) and x > 0


def default_scheduler(method: str, mode: str | None = None) -> Scheduler:
    """The default scheduler of a method.

    Args:
        method: ``"eki"``, ``"eks"`` or ``"uki"``.
        mode: UKI's mode; ``"iterative"`` gets ``DefaultScheduler(1.0)`` (the papers'
            unit step, run beyond T = 1), anything else the DMC.

    Returns:
        ``DataMisfitController()`` for EKI and tempering UKI,
        ``EKSStableScheduler(numerator=EKS_DEFAULT_NUMERATOR)`` for EKS.
    """
    if method in ("eki", "uki"):
        if method == "uki" and mode == "iterative":
            return DefaultScheduler(1.0)
        return DataMisfitController()
    if method == "eks":
        return EKSStableScheduler(numerator=EKS_DEFAULT_NUMERATOR)
    raise ValueError(f"default_scheduler: method must be 'eki', 'eks' or 'uki', got {method!r}.")


def check_scheduler(method: str, scheduler: Scheduler, mode: str | None = None) -> None:
    """Warn about scheduler choices that do not fit the method.

    EKS with a :class:`DataMisfitController` gets a ``UserWarning``: EKS's posterior is
    its long-time limit, not the state at T = 1 where the DMC stops. So does iterative
    UKI with a :class:`DataMisfitController`: its prediction inflation Σ_ω is added once
    per iteration, not per unit of time, so the controller's small steps let the Gaussian
    inflate faster than the data shrink it (measured in the scheduler study: T = 0.32
    after 50 iterations).
    """
    if not isinstance(scheduler, Scheduler):
        raise TypeError(
            f"scheduler must be a Scheduler (DataMisfitController, EKSStableScheduler, "
            f"DefaultScheduler), got {type(scheduler).__name__}."
        )
    if method == "eks" and isinstance(scheduler, DataMisfitController):
        warn(
            "EKS with a DataMisfitController: the EKS/ALDI posterior is the long-time "
            "(equilibrium) limit of the dynamics, not the ensemble at T = "
            f"{scheduler.terminate_at:g} where the controller stops; and its steps can be "
            "too large for EKS's explicit drift, so that the ensemble diverges (an "
            "EnsembleDivergenceError). Use EKSStableScheduler (the default for EKS) and run "
            "to equilibrium.",
            UserWarning,
        )
    if method == "uki" and mode == "iterative" and isinstance(scheduler, DataMisfitController):
        warn(
            "iterative UKI with a DataMisfitController: the prediction inflation is applied "
            "per iteration, not per unit time, so small controller steps let the Gaussian "
            "inflate faster than the data can shrink it. Use DefaultScheduler(1.0) (the "
            "default for iterative UKI) or uki_mode='tempering' for a posterior.",
            UserWarning,
        )

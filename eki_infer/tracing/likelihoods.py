"""Gaussian observation sites: their mean (the forward map's output), their noise Γ and
their pointwise log-likelihood.

An observed sample site is served when its distribution, after stripping
``ExpandedDistribution`` (``.expand``, plates) and ``Independent`` (``.to_event``), is one
of

- ``Normal(loc, scale)``: the mean is ``loc`` and Γ is diagonal; a scalar ``scale``
  gives a :class:`~eki_infer.noise.ScalarNoise`, anything else (a broadcast array scale,
  a plate, ``.to_event``) a :class:`~eki_infer.noise.DiagonalNoise` with the broadcast
  variances in the order of the flattened data;
- ``MultivariateNormal`` (built from ``covariance_matrix``, ``precision_matrix`` or
  ``scale_tril``; NumPyro keeps the Cholesky factor, which is used as is): a
  :class:`~eki_infer.noise.DenseNoise`; with a batch of events (a plate around an MVN)
  an :class:`~eki_infer.noise.EventBlocksNoise`, one factor per event (never the
  block-diagonal matrix);
- ``LowRankMultivariateNormal``: a :class:`~eki_infer.noise.LowRankNoise`, and for a
  batch of events an :class:`~eki_infer.noise.EventBlocksNoise` of them.

The distribution may broadcast against the data (``Normal(mu, 1)`` observed on a vector),
in which case the site's shape is the data's shape; data that would themselves be
broadcast (repeated) to fit the distribution, such as a column vector against a vector,
are refused. Masks (``obs_mask``,
``handlers.mask``) are rejected rather than silently dropped; see
:mod:`eki_infer.tracing.problem`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from eki_infer.noise import DenseNoise, DiagonalNoise, EventBlocksNoise, LowRankNoise, ScalarNoise
from eki_infer.tracing.errors import ModelTracingError

__all__ = ["GAUSSIAN_LIKELIHOODS", "GaussianSite", "analyse_observation"]

#: Likelihood families eki_infer serves.
GAUSSIAN_LIKELIHOODS = ("Normal", "MultivariateNormal", "LowRankMultivariateNormal")

_MASK_HINT = (
    "masked or missing observations are not supported: drop the missing entries from the "
    "data and index the model's output with the observed positions instead"
)


class GaussianSite(NamedTuple):
    """What the tracer knows about one observed Gaussian site at trace time."""

    family: str  # one of GAUSSIAN_LIKELIHOODS
    shape: tuple[int, ...]  # value shape: the data's (the distribution broadcasts to it)
    event_ndim: int  # 0 for Normal, 1 for the multivariate families
    scalar_scale: bool  # Normal with one scale for all elements: Γ = σ² I
    # trailing axes one log-density value covers: the distribution's event dims
    # (``.to_event`` included), as NumPyro's log_prob and log_likelihood sum them
    density_ndim: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.shape[: len(self.shape) - self.event_ndim]

    # -- evaluated at every run (jit/vmap-able) ------------------------------------

    def mean(self, fn):
        """The site's mean, flattened: its part of the forward map."""
        return jnp.broadcast_to(_base(fn).mean, self.shape).reshape(-1)

    def pointwise_log_likelihood(self, fn, obs):
        """log-density per event of the site's distribution, as NumPyro's ``log_prob``
        gives it: one value per batch element, the event dims (``.to_event`` and the
        multivariate families' vector) summed; shape ``self.shape[:-density_ndim]``."""
        base = _base(fn)
        obs = jnp.broadcast_to(obs, self.shape)
        per_base_event = jnp.broadcast_to(base.log_prob(obs), self.batch_shape)
        extra = self.density_ndim - self.event_ndim  # axes reinterpreted by .to_event
        return jnp.sum(per_base_event, axis=tuple(range(-extra, 0))) if extra else per_base_event

    def log_density_from_residual(self, noise, residual):
        """What :meth:`pointwise_log_likelihood` gives, from the site's residual
        y − G(u), shape ``(..., size)``, and its block of Γ (:meth:`noise`) instead of
        the model's distribution: a run's outputs already hold the means, so the
        log-likelihood of its draws needs no second forward run (a black-box simulator
        would be called again, once per draw)."""
        lead = residual.shape[:-1]
        if self.family == "Normal":
            variance = noise.variances()
            per_base_event = -0.5 * (residual**2 / variance + jnp.log(2 * jnp.pi * variance))
        elif isinstance(noise, EventBlocksNoise):  # a plate of multivariate events
            events = residual.reshape(*lead, noise.num_events, noise.event_size)
            per_base_event = jax.vmap(
                lambda block, r: block.log_prob(r), in_axes=(0, -2), out_axes=-1
            )(noise.blocks, events)
        else:  # one multivariate event
            per_base_event = noise.log_prob(residual)
        per_base_event = per_base_event.reshape(*lead, *self.batch_shape)
        extra = self.density_ndim - self.event_ndim  # axes reinterpreted by .to_event
        return jnp.sum(per_base_event, axis=tuple(range(-extra, 0))) if extra else per_base_event

    def noise_parameters(self, fn):
        """The arrays that define Γ, broadcast to the site (to compare between runs)."""
        base = _base(fn)
        b = self.batch_shape
        if self.family == "Normal":
            return (jnp.broadcast_to(base.scale, self.shape),)
        if self.family == "MultivariateNormal":
            k = self.shape[-1]
            return (jnp.broadcast_to(base.scale_tril, (*b, k, k)),)
        k, r = base.cov_factor.shape[-2:]
        return (
            jnp.broadcast_to(base.cov_factor, (*b, k, r)),
            jnp.broadcast_to(base.cov_diag, (*b, k)),
        )

    # -- trace time only (concrete arrays) ------------------------------------------

    def noise(self, params):
        """The site's block of Γ from concrete :meth:`noise_parameters` (NumPy arrays)."""
        n_events = math.prod(self.batch_shape)
        params = [np.asarray(p) for p in params]
        if self.family == "Normal":
            (scale,) = params
            if self.scalar_scale:
                return ScalarNoise(scale.reshape(-1)[0] ** 2, self.size)
            return DiagonalNoise(scale.reshape(-1) ** 2)
        if self.family == "MultivariateNormal":
            (tril,) = params
            k = self.shape[-1]
            if n_events == 1:
                return DenseNoise(scale_tril=tril.reshape(k, k))
            return EventBlocksNoise.stack(
                lambda t: DenseNoise(scale_tril=t), tril.reshape(n_events, k, k)
            )
        factor, diag = params
        k, r = factor.shape[-2:]
        if n_events == 1:
            return LowRankNoise(factor.reshape(k, r), diag.reshape(k))
        return EventBlocksNoise.stack(
            LowRankNoise, factor.reshape(n_events, k, r), diag.reshape(n_events, k)
        )

    def check_noise(self, name, params):
        """Raises unless the concrete noise parameters define a proper Γ: finite, a
        positive ``scale`` (Normal), a Cholesky factor with a positive diagonal
        (MultivariateNormal), a positive ``cov_diag`` (LowRankMultivariateNormal).

        NumPyro validates these only for concrete arguments; a scale computed inside
        the model is a tracer there, and a negative one would otherwise pass as its
        square."""
        params = [np.asarray(p) for p in params]
        if not all(np.all(np.isfinite(p)) for p in params):
            raise ModelTracingError(
                f"observed site '{name}': its {self.family} noise parameters are not all "
                "finite (NaN or inf in the scale or covariance; a covariance that is not "
                "positive definite gives a NaN Cholesky factor).",
                name,
            )
        if self.family == "Normal":
            values, what = params[0], "scale"
        elif self.family == "MultivariateNormal":
            values, what = np.diagonal(params[0], axis1=-2, axis2=-1), "scale_tril diagonal"
        else:
            values, what = params[1], "cov_diag"
        bad = int(np.sum(values <= 0))
        if bad:
            raise ModelTracingError(
                f"observed site '{name}': {bad} entries of its {self.family} {what} are not "
                f"positive (smallest {float(np.min(values)):.3g}); the noise covariance must "
                "be positive definite.",
                name,
            )
        self._check_representable(
            name, values, what, squared=self.family != "LowRankMultivariateNormal"
        )

    def _check_representable(self, name, values, what, squared):
        """Raises where Γ's entries (``values`` squared for a scale, as they are for a
        variance) leave the normal range of the working float type: in float32 a scale
        below 1.1e-19 squares to a subnormal or 0, the whitening divides by it and every
        misfit is infinite (the schedulers then fail with no usable step)."""
        dtype = jnp.result_type(float)
        info = np.finfo(dtype)
        with np.errstate(over="ignore", under="ignore"):  # inf / 0 are the answer here
            variance = np.asarray(values, dtype=np.float64) ** (2 if squared else 1)
        low, high = float(np.min(variance)), float(np.max(variance))
        if low >= info.tiny and high <= info.max:
            return
        side = (
            f"smallest {what} {float(np.min(values)):.3g}"
            if low < info.tiny
            else f"largest {what} {float(np.max(values)):.3g}"
        )
        raise ModelTracingError(
            f"observed site '{name}': the noise variance of its {self.family} ({side}) is "
            f"outside the normal range of {np.dtype(dtype).name} ({info.tiny:.2g} to "
            f"{info.max:.2g}), so Γ cannot be represented. Rescale the data and the model's "
            "output (measure them in other units), or enable float64 "
            "(jax.config.update('jax_enable_x64', True)).",
            name,
        )

    def check_data(self, name, data):
        """Raises for non-finite or non-numeric data."""
        data = np.asarray(data)
        _check_numeric(name, data.dtype)
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise ModelTracingError(
                f"observed site '{name}' has {bad} non-finite value(s) (NaN or inf) in its "
                f"data; {_MASK_HINT}.",
                name,
            )


def _check_numeric(name, dtype):
    """Raises for data of a non-numeric (or complex) dtype: strings, objects, booleans."""
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ModelTracingError(
            f"observed site '{name}' has non-numeric data of dtype {dtype}.", name
        )


def _base(fn):
    while isinstance(fn, dist.ExpandedDistribution | dist.Independent):
        fn = fn.base_dist
    return fn


def _family(fn):
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return "masked"
        if isinstance(fn, dist.ExpandedDistribution | dist.Independent):
            fn = fn.base_dist
            continue
        break
    # exact classes: subclasses (e.g. a user's Normal with a different log_prob) or
    # transformed Gaussians are not Gaussian in data space
    for name in GAUSSIAN_LIKELIHOODS:
        if type(fn) is getattr(dist, name):
            return name
    return None


def _inner_name(fn):
    names = [type(fn).__name__]
    while isinstance(fn, dist.ExpandedDistribution | dist.Independent | dist.MaskedDistribution):
        fn = fn.base_dist
        names.append(type(fn).__name__)
    return names[-1] if len(names) == 1 else f"{names[-1]} (wrapped in {', '.join(names[:-1])})"


def analyse_observation(name, fn, obs, sample_shape=()) -> GaussianSite:
    """Checks an observed site's family and shapes and returns its :class:`GaussianSite`
    (only shapes are read: ``fn`` and ``obs`` may be abstract tracers)."""
    family = _family(fn)
    if family == "masked":
        raise ModelTracingError(f"observed site '{name}' is masked: {_MASK_HINT}.", name)
    if family is None:
        if isinstance(_base(fn), dist.Unit):
            what = "a numpyro.factor term (or a Unit distribution)"
        else:
            what = f"likelihood {_inner_name(fn)}"
        raise ModelTracingError(
            f"observed site '{name}' has {what}, which is not Gaussian. eki_infer needs a "
            "Gaussian likelihood with known noise: one of "
            + ", ".join(GAUSSIAN_LIKELIHOODS)
            + " (with .expand/.to_event or inside plates). For a non-Gaussian likelihood "
            "(a classifier's cross-entropy, say) use the optimisation mode, "
            "eki_infer.ml.EKIOptimizer, which takes any loss. (If you meant to fix a latent "
            "parameter to a value, use numpyro.handlers.substitute rather than condition.)",
            name,
        )
    # before the shapes: a string's shape () would otherwise be reported as a broadcast
    _check_numeric(name, obs.dtype if hasattr(obs, "dtype") else np.asarray(obs).dtype)
    fn_shape = tuple(sample_shape) + tuple(fn.shape())
    obs_shape = tuple(np.shape(obs))
    try:
        shape = tuple(np.broadcast_shapes(fn_shape, obs_shape))
    except ValueError as err:
        raise ModelTracingError(
            f"observed site '{name}': data of shape {obs_shape} does not broadcast with the "
            f"distribution's shape {fn_shape}.",
            name,
        ) from err
    if shape != obs_shape:
        raise ModelTracingError(
            f"observed site '{name}': data of shape {obs_shape} against the distribution's "
            f"shape {fn_shape} broadcast to {shape}, so each datum would be compared with "
            "several of the model's outputs (the data repeated, as NumPyro would, and almost "
            f"always a slip such as a column vector for a vector). Give the data the shape "
            f"{fn_shape} (or more leading dims for replicated observations), or the site's "
            "distribution the data's shape (.expand, a plate).",
            name,
        )
    event_ndim = 0 if family == "Normal" else 1
    scalar = family == "Normal" and math.prod(np.shape(_base(fn).scale)) == 1
    return GaussianSite(family, shape, event_ndim, scalar, len(fn.event_shape))

"""Tracing a NumPyro model into an :class:`InverseProblem` for ensemble Kalman methods.

:func:`trace_model` runs the model under a custom handler (:class:`_WhitenedRun`) that, at
each latent sample site in model order, takes the next slice of a whitened vector u and
maps it through that site's distribution with :func:`~eki_infer.tracing.priors.
whitened_transform`. Because the distribution is the one the model builds *at that
moment*, its parameters may depend on earlier latents (eight schools' ``theta ~
Normal(mu, tau)``): u ~ N(0, I_d) gives exactly the prior, hierarchical or not. Observed
sites are left as they are and read: their means, concatenated, are the forward map
G(u) ∈ R^M; their data are y; their scales/covariances make the noise Γ
(:mod:`eki_infer.tracing.likelihoods`). One execution of the model gives both the
constrained values and G(u), and everything is jit- and vmap-able.

At trace time (once):

- the model is traced abstractly (``jax.make_jaxpr``: nothing computed or compiled) to
  find the sites, their shapes and plates (dimension names); unsupported constructs
  raise :class:`ModelTracingError` naming the site: discrete, improper or unsupported
  priors, non-Gaussian likelihoods, masks, subsampled plates, scale factors
  (``handlers.scale``), Python control flow on sampled values, two sites of one name,
  a model without latent or without observed sites (a site with ``obs=None`` becomes
  latent: "did you pass the data?"), empty or non-numeric data, and prior parameters
  known there to be out of range;
- the model is then compiled once and run (vmapped) at u = 0, two random u and one
  perturbation of each latent site's slice. This gives the data (rejected if not
  finite) and Γ; Γ must come out the same every time, otherwise the noise depends on a
  latent variable, which is not supported yet (the error names the observed site and
  the latent sites it moves with); the data must too, and neither may be computed from
  a latent at all (a walk over the model's jaxpr finds ``jnp.where(a > 2.5, ...)``,
  which is constant at the probe points). A prior whose parameters are out of range at
  every probe point is an error; where they are out of range only at some u (a
  hierarchy such as Uniform(lo, 1)), the member fails when the model runs: its values
  and G(u) are NaN, so the ensemble methods redraw or reject it. A latent site whose
  perturbation changes neither the forward map nor any other latent value gets a
  warning (usually data that was not passed, in a model that has another observed site).

Sites whose value is already set by an inner handler (``numpyro.handlers.substitute``) are
constants, not latents. ``numpyro.param`` sites keep their initial value. Masks are
rejected rather than handled: dropping the masked entries from y, G and Γ would give
the right answer for diagonal noise but not for correlated noise, and a rejected mask
is easy to rewrite (index the mean with the observed positions), so the tracer keeps one
clear rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.primitives import Messenger

from eki_infer.model_args import digest_leaves, model_fingerprint, split_model_args
from eki_infer.noise import Noise, block_diagonal
from eki_infer.tracing.errors import ModelTracingError
from eki_infer.tracing.likelihoods import GaussianSite, analyse_observation
from eki_infer.tracing.priors import (
    check_prior_parameters,
    prior_parameter_checks,
    whitened_shape,
    whitened_transform,
)
from eki_infer.user_warnings import warn

__all__ = [
    "DeterministicSite",
    "InverseProblem",
    "LatentSite",
    "ObservedSite",
    "trace_model",
]


class LatentSite(NamedTuple):
    """A latent sample site: its value has ``shape``; it takes the whitened coordinates
    ``u[start:stop]`` (``size = stop - start``, equal to ``prod(shape)`` except under a
    shape-changing ``TransformedDistribution``)."""

    name: str
    shape: tuple[int, ...]
    size: int
    start: int
    stop: int
    dims: tuple[str, ...]
    family: str  # the distribution's class name, for summaries


class ObservedSite(NamedTuple):
    """An observed Gaussian site: its data are ``observations[start:stop]`` (flattened in C
    order from ``shape``), its mean ``forward(u)[start:stop]``."""

    name: str
    shape: tuple[int, ...]
    size: int
    start: int
    stop: int
    dims: tuple[str, ...]
    family: str  # Normal, MultivariateNormal or LowRankMultivariateNormal
    # trailing axes of ``shape`` one log-likelihood value covers (the distribution's
    # event dims, ``.to_event`` included): the pointwise log-likelihood has one value per
    # element of ``shape[: len(shape) - density_ndim]``, as NumPyro's log_likelihood
    density_ndim: int = 0


class DeterministicSite(NamedTuple):
    """A ``numpyro.deterministic`` site, returned by ``prior_transform`` with the latents."""

    name: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]


# --------------------------------------------------------------------------------------
# the handler


def _is_trivial(value, neutral) -> bool:
    """True when a mask/scale is concretely the neutral value (True / 1)."""
    if value is None:
        return True
    try:
        return bool(np.all(np.asarray(value) == neutral))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False  # traced: cannot tell, so not trivial


def _strip_trivial_masks(fn):
    """Drops MaskedDistribution wrappers whose mask is concretely all True."""
    if isinstance(fn, dist.MaskedDistribution) and _is_trivial(fn._mask, True):
        return _strip_trivial_masks(fn.base_dist)
    return fn


def _has_mask(fn):
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return True
        if not isinstance(fn, dist.ExpandedDistribution | dist.Independent):
            return False
        fn = fn.base_dist


class _Record(NamedTuple):
    name: str
    fn: Any
    value: Any
    stack: tuple
    sample_shape: tuple


class _WhitenedRun(Messenger):
    """Sets each latent site to the whitened transform of the next slice of ``u``.

    ``u`` is a flat array (or a list of one slice per latent site, in order); with
    ``u=None`` every latent gets whitened zeros (the prior
    median, site by site), which is how the tracer discovers the model. ``strict`` turns on
    the checks that need concrete values (masks, scales, plates), done at trace time.
    """

    def __init__(self, fn, u=None, strict: bool = False):
        super().__init__(fn)
        self.u = u
        self.strict = strict
        self.offset = 0
        self.latents: list[_Record] = []
        self.observed: list[_Record] = []
        self.deterministic: list[_Record] = []
        self.params: list[str] = []
        self.names: set[str] = set()
        # (site, what, ok) of the prior parameters computed as the model runs
        # (priors.prior_parameter_checks); where one fails the member's values and
        # outputs become NaN
        self.parameter_checks: list[tuple[str, str, jax.Array]] = []
        self.invalid = jnp.zeros((), bool)

    def _claim(self, name, kind):
        """Refuses (at trace time) a second site of the same name, as NumPyro's own trace
        does: the output maps sites by name, so one would silently replace the other."""
        if self.strict and name in self.names:
            raise ModelTracingError(
                f"two sites are named '{name}' (the second a {kind} site): every sample "
                "and deterministic site needs its own name. In a Python loop, "
                f"name them by index (f'{name}_{{i}}') or use a numpyro.plate.",
                name,
            )
        self.names.add(name)

    def process_message(self, msg):
        kind = msg["type"]
        if kind == "sample":
            self._claim(msg["name"], kind)
        if kind == "param":
            self.params.append(msg["name"])
            return
        if kind == "control_flow":
            raise ModelTracingError(
                "the model uses numpyro.contrib.control_flow (scan/cond) around sample "
                "sites, which the tracer cannot look into; write the loop in Python, or "
                "keep jax.lax.scan for the deterministic parts only"
                + (f" (scan/cond '{msg['name']}')." if msg.get("name") else "."),
                msg.get("name"),
            )
        if kind == "plate" and self.strict:
            size, subsample_size = msg["args"]
            if subsample_size is not None and subsample_size != size:
                raise ModelTracingError(
                    f"plate '{msg['name']}' is subsampled (subsample_size={subsample_size} "
                    f"of {size}): ensemble Kalman methods use all the data at every step; "
                    "remove subsample_size.",
                    msg["name"],
                )
            return
        if kind != "sample":
            return
        name = msg["name"]
        role = "observed site" if msg["is_observed"] else "latent site"
        fn = _strip_trivial_masks(msg["fn"])
        msg["fn"] = fn
        if self.strict and (not _is_trivial(msg.get("mask"), True) or _has_mask(fn)):
            raise ModelTracingError(
                f"{role} '{name}' is masked (obs_mask or handlers.mask): masked sites are "
                "not supported; drop the missing entries from the data and index the "
                "model's output with the observed positions instead.",
                name,
            )
        if self.strict and not _is_trivial(msg.get("scale"), 1.0):
            raise ModelTracingError(
                f"{role} '{name}' has a log-density scale factor (handlers.scale or a "
                "subsampled plate), which ensemble Kalman methods cannot represent; "
                "remove it (to temper a Gaussian likelihood, scale its noise instead).",
                name,
            )
        sample_shape = tuple(msg["kwargs"].get("sample_shape", ()) or ())
        stack = tuple(msg.get("cond_indep_stack", ()))
        if msg["is_observed"]:
            self.observed.append(_Record(name, msg["fn"], msg["value"], stack, sample_shape))
            return
        if msg["value"] is not None:  # substituted by an inner handler: a constant
            return
        fn = msg["fn"]
        if sample_shape:
            fn = fn.expand(sample_shape + tuple(fn.batch_shape))
        if self.strict:
            check_prior_parameters(fn, name)
        n = math.prod(whitened_shape(fn, name))
        if self.u is None:
            chunk = jnp.zeros((n,), dtype=jnp.result_type(float))
        elif isinstance(self.u, list):  # one array per latent site (_latent_inputs)
            chunk = self.u[len(self.latents)]
        else:
            if self.offset + n > self.u.shape[-1]:
                raise ModelTracingError(
                    f"latent site '{name}' needs whitened coordinates beyond the "
                    f"{self.u.shape[-1]} found at trace time: the model's structure changed "
                    "between runs.",
                    name,
                )
            chunk = self.u[self.offset : self.offset + n]
        value = whitened_transform(fn, chunk, name)
        checks = prior_parameter_checks(fn)
        if checks:
            valid = functools.reduce(jnp.logical_and, [ok for _, ok in checks])
            value = jnp.where(valid, value, jnp.nan)
            self.invalid = self.invalid | ~valid
            self.parameter_checks += [(name, what, ok) for what, ok in checks]
        msg["value"] = value
        self.latents.append(_Record(name, fn, value, stack, sample_shape))
        self.offset += n

    def postprocess_message(self, msg):
        if msg["type"] == "deterministic":
            self._claim(msg["name"], "deterministic")
            stack = tuple(msg.get("cond_indep_stack", ()))
            self.deterministic.append(_Record(msg["name"], None, msg["value"], stack, ()))


def _dims(name, shape, stack, event_ndim):
    """Dimension names: the plate's name on the axes a plate spans, else name_dim_i."""
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    batch_ndim = len(shape) - event_ndim
    for frame in stack:
        if frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return tuple(dims)


# --------------------------------------------------------------------------------------
# the problem


class ProbeSignature:
    """What a model computed at the tracer's probe points, for checkpoints to compare:
    a digest of the latent values and the noise (exact), and the forward outputs, equal
    to another's within a relative 1e-6 (NaN where both failed). The data are not in it
    (checkpoints digest them on their own, so a mismatch can say which differs). A
    simulator whose outputs vary by more than that between runs (a stochastic one, say)
    cannot resume a checkpoint."""

    def __init__(self, digest: str, outputs):
        self.digest = digest
        self.outputs = np.asarray(outputs)

    def __eq__(self, other):
        if not isinstance(other, ProbeSignature) or self.digest != other.digest:
            return False
        if self.outputs.shape != other.outputs.shape:
            return False
        return bool(np.allclose(self.outputs, other.outputs, rtol=1e-6, atol=0.0, equal_nan=True))

    def __hash__(self):
        return hash(self.digest)


@dataclasses.dataclass(frozen=True, eq=False)
class InverseProblem:
    """A NumPyro model seen as y = G(u) + η, η ~ N(0, Γ), u ~ N(0, I_d).

    Built by :func:`trace_model`; immutable; hashed by identity (so it can be a static
    argument of ``jax.jit``). All methods that take ``u`` are jit- and vmap-able; they
    take u of shape (d,), and ``prior_transform``, ``forward``, ``transform_and_forward``
    and ``pointwise_log_likelihood`` also accept (..., d) and map over the leading axes.

    Attributes:
        model, model_args, model_kwargs: the model and the arguments it was traced with.
        dim: d, the number of whitened coordinates (all latent sites, flattened).
        data_dim: M, the number of observations.
        latent_sites, observed_sites, deterministic_sites: the sites, in model order.
        observations: y, shape (M,), all observed data flattened and concatenated.
        noise: Γ as an :mod:`eki_infer.noise` object (block diagonal over sites).
    """

    model: Callable
    model_args: tuple
    model_kwargs: dict
    dim: int
    data_dim: int
    latent_sites: tuple[LatentSite, ...]
    observed_sites: tuple[ObservedSite, ...]
    deterministic_sites: tuple[DeterministicSite, ...]
    observations: jax.Array
    noise: Noise
    _gaussian: tuple[GaussianSite, ...] = dataclasses.field(repr=False, default=())
    # each observed site's block of Γ, in order (``noise`` is their block diagonal, with
    # diagonal blocks merged): the per-event log-likelihood from outputs needs them
    site_noises: tuple[Noise, ...] = dataclasses.field(repr=False, default=())
    # the model evaluated at the tracer's fixed probe points (latent values, noise and
    # data exactly; outputs to a relative 1e-6): what the model computes, not only its
    # structure, so that a checkpoint written for other priors, noise or simulator is
    # not resumed
    probe_signature: ProbeSignature | None = dataclasses.field(repr=False, default=None)
    # :func:`~eki_infer.model_args.model_fingerprint` of ``model``, taken once at trace
    # time: the compiled-code caches (probe, engine, SMC) key on it
    model_fingerprint: tuple = dataclasses.field(repr=False, default=())

    # -- one execution of the model --------------------------------------------------

    def _run(self, u):
        u = jnp.asarray(u)
        if u.shape != (self.dim,):
            raise ValueError(f"u must have shape ({self.dim},), got {u.shape}")
        run = _WhitenedRun(handlers.seed(self.model, rng_seed=0), u=u)
        run(*self.model_args, **self.model_kwargs)
        if run.offset != self.dim or len(run.observed) != len(self.observed_sites):
            raise ModelTracingError(
                "the model's structure (latent sizes or observed sites) changed since it "
                "was traced; eki_infer needs a model whose sites do not depend on values."
            )
        return run

    def _values(self, run):
        values = {r.name: r.value for r in run.latents}
        values.update({r.name: r.value for r in run.deterministic})
        return values

    def _forward(self, run):
        means = [g.mean(r.fn) for g, r in zip(self._gaussian, run.observed, strict=True)]
        g = jnp.concatenate(means) if len(means) > 1 else means[0]
        return jnp.where(run.invalid, jnp.nan, g)

    def _batched(self, f, u, *extra):
        u = jnp.asarray(u)
        if u.ndim == 1:
            return f(u, *extra)
        lead = u.shape[:-1]
        out = jax.vmap(lambda v: f(v, *extra))(u.reshape(-1, u.shape[-1]))
        return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), out)

    # -- public maps -------------------------------------------------------------------

    def prior_transform(self, u):
        """u (d,) -> {latent site: constrained value, deterministic site: value}.

        For u ~ N(0, I_d) the latent values are distributed exactly as the prior."""
        return self._batched(lambda v: self._values(self._run(v)), u)

    def forward(self, u):
        """u (d,) -> G(u) (M,): the concatenated means of the observed sites."""
        return self._batched(lambda v: self._forward(self._run(v)), u)

    def transform_and_forward(self, u):
        """u (d,) -> (prior_transform(u), forward(u)) from one execution of the model."""

        def f(v):
            run = self._run(v)
            return self._values(run), self._forward(run)

        return self._batched(f, u)

    def unflatten_observations(self, z):
        """(..., M) -> {observed site: (..., *site shape)}."""
        z = jnp.asarray(z)
        lead = z.shape[:-1]
        return {
            s.name: z[..., s.start : s.stop].reshape(lead + s.shape) for s in self.observed_sites
        }

    def pointwise_log_likelihood(self, u):
        """u (d,) -> {observed site: log-likelihood per event of its distribution (one
        value per batch element, the event dims summed: what NumPyro's ``log_likelihood``
        gives, so that LOO and ``az.compare`` match a NUTS run of the same model; a site
        in a plate gives one value per plate element, a ``.to_event`` site one in all)}."""

        def f(v):
            run = self._run(v)
            return {
                r.name: g.pointwise_log_likelihood(r.fn, r.value)
                for g, r in zip(self._gaussian, run.observed, strict=True)
            }

        return self._batched(f, u)

    def pointwise_log_likelihood_from_outputs(self, outputs):
        """outputs G(u) (..., M) -> what :meth:`pointwise_log_likelihood` gives at those
        points, without running the model again (non-finite outputs give NaN)."""
        residual = self.observations - jnp.asarray(outputs)
        return {
            site.name: g.log_density_from_residual(noise, residual[..., site.start : site.stop])
            for site, g, noise in zip(
                self.observed_sites, self._gaussian, self.site_noises, strict=True
            )
        }

    def log_likelihood(self, u):
        """u (d,) -> log N(y; G(u), Γ), the total Gaussian log-likelihood."""
        return self.noise.log_prob(self.observations - self.forward(u))

    def misfit(self, u):
        """u (d,) -> ½ ‖Γ^{-1/2} (y − G(u))‖²."""
        return self.noise.misfit(self.observations - self.forward(u))

    def sample_observations(self, rng_key, u):
        """A draw of the data from the likelihood, G(u) + η with η ~ N(0, Γ), as
        {observed site: value of the site's shape} (for posterior predictive checks).
        With u of shape (n, d) the key is split into one per row."""
        u = jnp.asarray(u)
        if u.ndim == 1:
            return self.unflatten_observations(self.forward(u) + self.noise.sample(rng_key))
        keys = jax.random.split(rng_key, math.prod(u.shape[:-1]))
        flat = u.reshape(-1, u.shape[-1])
        z = jax.vmap(lambda k, v: self.forward(v) + self.noise.sample(k))(keys, flat)
        return self.unflatten_observations(z.reshape((*u.shape[:-1], self.data_dim)))

    def __repr__(self):
        def fmt(sites):
            return ", ".join(f"{s.name}{list(s.shape)}" for s in sites) or "-"

        return (
            f"InverseProblem(d={self.dim}, M={self.data_dim}, latent: "
            f"{fmt(self.latent_sites)}; observed: {fmt(self.observed_sites)}; "
            f"noise: {self.noise!r})"
        )


# --------------------------------------------------------------------------------------
# tracing


def _discover(model, args, kwargs):
    """Runs the model abstractly (``jax.make_jaxpr``, nothing is compiled or computed):
    the records hold the sites' names, distributions and shapes, not values."""
    holder = {}

    def run_once():
        run = _WhitenedRun(handlers.seed(model, rng_seed=0), u=None, strict=True)
        run(*args, **kwargs)
        holder["run"] = run
        return jnp.zeros(())

    try:
        jax.make_jaxpr(run_once)()
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerIntegerConversionError,
    ) as err:
        raise ModelTracingError(
            "the model could not be traced with abstract values: it must be "
            "jax.jit-compatible (no Python if/for on sampled values, no NumPy functions on "
            f"them; use jnp and jax.lax). JAX said: {str(err).splitlines()[0]}"
        ) from err
    return holder["run"]


def trace_model(model, *args, **kwargs) -> InverseProblem:
    """Traces ``model(*args, **kwargs)`` into an :class:`InverseProblem`.

    The model is ordinary NumPyro code: continuous priors, a deterministic forward
    computation, Gaussian likelihoods with known noise and the data passed as ``obs``.
    Raises :class:`ModelTracingError` (naming the site) for what cannot be served.
    The model is traced abstractly once and then compiled once, evaluated at a few
    whitened points to read the data and the noise and to check that the noise does not
    depend on latent variables.
    """
    run = _discover(model, args, kwargs)

    gaussian = [analyse_observation(r.name, r.fn, r.value, r.sample_shape) for r in run.observed]
    if not run.observed:
        sampled = ", ".join(f"'{r.name}' ({_family(r.fn)})" for r in run.latents)
        raise ModelTracingError(
            "the model has no observed site: did you pass the data? A site whose obs is "
            "None is sampled as a latent variable"
            + (f"; this run sampled {sampled}" if sampled else "")
            + ". Pass the observations the way the model takes them, after the key "
            "(engine.run(rng_key, x, y=y_obs)) or to trace_model (trace_model(model, x, "
            "y=y_obs))."
        )
    params = ", ".join(f"'{name}'" for name in dict.fromkeys(run.params))
    if not run.latents:
        raise ModelTracingError(
            "the model has no latent sample site: there is nothing to infer (sites set by "
            "substitute/condition are constants"
            + (f"; numpyro.param sites ({params}) are not inferred" if params else "")
            + "). Give each unknown a prior with numpyro.sample."
        )
    if params:
        warn(
            f"numpyro.param sites {params} are held at their initial values: only sample "
            "sites with a prior are inferred. To infer one, make it a numpyro.sample site "
            "with a prior; to fix it to a value, this is already what happens.",
            UserWarning,
        )

    for g, r in zip(gaussian, run.observed, strict=True):
        if not isinstance(r.value, jax.core.Tracer):  # data the model was given, not computed
            g.check_data(r.name, r.value)  # before the probe compiles the model on it
        if g.size == 0:
            raise ModelTracingError(
                f"observed site '{r.name}' has no data (shape {g.shape}): drop the site, "
                "or pass the observations it should hold.",
                r.name,
            )

    latent_sites, start = [], 0
    for r in run.latents:
        n = math.prod(whitened_shape(r.fn, r.name))
        shape = tuple(jnp.shape(r.value))
        dims = _dims(r.name, shape, r.stack, len(r.fn.event_shape))
        latent_sites.append(LatentSite(r.name, shape, n, start, start + n, dims, _family(r.fn)))
        start += n
    d = start
    if d == 0:
        shapes = ", ".join(f"'{s.name}' {s.shape}" for s in latent_sites)
        raise ModelTracingError(
            f"the model's latent sites hold no elements ({shapes}): there is nothing to "
            "infer. Check the plate sizes or the shapes of the priors."
        )

    observed_sites, start = [], 0
    for g, r in zip(gaussian, run.observed, strict=True):
        dims = _dims(r.name, g.shape, r.stack, g.density_ndim)
        observed_sites.append(
            ObservedSite(
                r.name, g.shape, g.size, start, start + g.size, dims, g.family, g.density_ndim
            )
        )
        start += g.size

    deterministic_sites = tuple(
        DeterministicSite(
            r.name, tuple(jnp.shape(r.value)), _dims(r.name, jnp.shape(r.value), r.stack, 0)
        )
        for r in run.deterministic
    )
    draft = InverseProblem(
        model=model,
        model_fingerprint=model_fingerprint(model),
        model_args=tuple(args),
        model_kwargs=dict(kwargs),
        dim=d,
        data_dim=start,
        latent_sites=tuple(latent_sites),
        observed_sites=tuple(observed_sites),
        deterministic_sites=deterministic_sites,
        observations=None,
        noise=None,
        _gaussian=tuple(gaussian),
    )
    check_names = [(site, what) for site, what, _ in run.parameter_checks]
    noise_params, data, probe_signature = _probe(draft, check_names)
    ys = []
    for g, site, x, params in zip(gaussian, observed_sites, data, noise_params, strict=True):
        g.check_data(site.name, x)
        g.check_noise(site.name, params)
        ys.append(np.broadcast_to(np.asarray(x, dtype=float), g.shape).reshape(-1))
    dtype = jnp.result_type(float)
    site_noises = tuple(g.noise(p) for g, p in zip(gaussian, noise_params, strict=True))
    noise = block_diagonal(site_noises)
    y_all = np.concatenate(ys)
    _warn_about_float32_resolution(observed_sites, y_all, probe_signature.outputs, noise, dtype)
    return dataclasses.replace(
        draft,
        observations=jnp.asarray(y_all, dtype=dtype),
        noise=noise,
        site_noises=site_noises,
        probe_signature=probe_signature,
    )


#: the noise sd must exceed this many roundings of the outputs (float32: the forward
#: map's values carry relative error ε = 1.2e-7): with noise sd 1e-6 on outputs of order
#: 1 (a few roundings) float32 transform EKI was 0.15 sd off, with 1e-4 (~10³) 0.001 sd
#: (``benchmarks/float32_precision.py``)
FLOAT32_MIN_NOISE_ROUNDINGS = 100.0


def _warn_about_float32_resolution(observed_sites, y, outputs, noise, dtype) -> None:
    """Warns, in float32 only, where an observed site's noise sd is within 100 roundings
    of its data or outputs (as the probe saw them): the misfit and the Kalman updates are
    then computed from differences float32 barely resolves."""
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-10:
        return
    outputs = np.abs(np.asarray(outputs, dtype=float))
    finite = np.where(np.isfinite(outputs), outputs, 0.0)  # failed probe rows: NaN
    magnitude = np.maximum(np.abs(y), np.max(finite, axis=0))
    sd = np.sqrt(np.asarray(noise.variances(), dtype=float))
    with np.errstate(divide="ignore"):
        roundings = sd / (eps * magnitude)
    coarse = [
        (site.name, float(np.min(roundings[site.start : site.stop])))
        for site in observed_sites
        if np.min(roundings[site.start : site.stop]) < FLOAT32_MIN_NOISE_ROUNDINGS
    ]
    if coarse:
        which = ", ".join(f"'{name}' ({r:.3g} roundings)" for name, r in coarse)
        warn(
            f"in float32 the noise sd of observed site(s) {which} is within "
            f"{FLOAT32_MIN_NOISE_ROUNDINGS:g} roundings (ε = {eps:.2g} times the data's or "
            "the outputs' size) of the values it is compared with, so misfits and Kalman "
            "updates lose accuracy (at a few roundings transform EKI was 0.15 sd off). Enable "
            "float64 (jax.config.update('jax_enable_x64', True)) or rescale the outputs "
            "(subtract a reference value).",
            UserWarning,
        )


def _family(fn):
    """The distribution's class name under .expand/.to_event wrappers."""
    while type(fn).__name__ in ("ExpandedDistribution", "Independent"):
        fn = fn.base_dist
    return type(fn).__name__


_PROBE_CACHE: dict = {}
_LATENT_INPUTS_CACHE: dict = {}  # _latent_inputs' answers, by the same key
_PROBE_CACHE_SIZE = 8


def _noise_parameters(problem: InverseProblem, run) -> list:
    """Each observed site's noise parameters in a run of the model (the probe's and
    :func:`_latent_inputs`' view of Γ)."""
    pairs = zip(problem._gaussian, run.observed, strict=True)
    return [g.noise_parameters(r.fn) for g, r in pairs]


def _cached(cache: dict, key, make):
    """``make()`` once per key (None: not cacheable), keeping the newest
    ``_PROBE_CACHE_SIZE`` entries."""
    if key is None:
        return make()
    if key not in cache:
        if len(cache) >= _PROBE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


def _structure_key(problem: InverseProblem, signature) -> tuple:
    """What the probe's compiled code depends on: the model, its arguments' shapes and
    static values (``signature``), its sites and its code (the fingerprint)."""
    return (
        problem.model,
        signature,
        problem.latent_sites,
        problem.observed_sites,
        problem.model_fingerprint,
    )


def _compiled_probe(problem: InverseProblem):
    """The probe as a function of U alone, compiled once per model structure.

    The model's array arguments are passed to the compiled function (see
    :mod:`eki_infer.model_args`), so tracing the same model again on new data of the
    same shapes (every ``EKIInference.run``) reuses the compiled probe.
    """
    data, signature, rebuild = split_model_args(problem.model_args, problem.model_kwargs)

    def probe(p, u):
        run = p._run(u)
        noise = _noise_parameters(p, run)
        observed = [jnp.asarray(r.value) for r in run.observed]
        latents = [r.value for r in run.latents]
        checks = [ok for _, _, ok in run.parameter_checks]
        return noise, observed, latents, p._forward(run), checks

    def probe_all(U, data):
        args, kwargs = rebuild(data)
        bound = dataclasses.replace(problem, model_args=args, model_kwargs=kwargs)
        return jax.vmap(lambda u: probe(bound, u))(U)

    key = None if signature is None else _structure_key(problem, signature)
    compiled = _cached(_PROBE_CACHE, key, lambda: jax.jit(probe_all))
    return lambda U: compiled(U, data)


def _latent_inputs(problem: InverseProblem) -> list[tuple[list[str], list[str]]]:
    """For each observed site, the latent sites its noise parameters are computed from
    and those its observed value (``obs``) is computed from.

    A structural check that complements the probe's values: the model's map from the
    latent slices of u to the noise parameters and the data is traced to a jaxpr once,
    and every equation that reads a value derived from a latent marks its outputs as
    derived too. A scale such as ``jnp.where(a > 2.5, 0.05, 0.3)`` takes one value at
    every probe point yet depends on ``a``; the probe alone would miss it. Conservative:
    an output of an equation (a loop, a callback) any of whose inputs depends on a latent
    counts as depending on it, and shape-only uses (``jnp.ones_like(mu)``) do not count."""
    _, signature, _ = split_model_args(problem.model_args, problem.model_kwargs)
    key = None if signature is None else _structure_key(problem, signature)
    sites = problem.latent_sites

    def noise_and_data(*parts):
        # one input per latent site (not a flat u, whose slices would all derive from it)
        run = _WhitenedRun(handlers.seed(problem.model, rng_seed=0), u=list(parts))
        run(*problem.model_args, **problem.model_kwargs)
        return _noise_parameters(problem, run), [jnp.asarray(r.value) for r in run.observed]

    def find():
        parts = [jnp.zeros(s.size, jnp.result_type(float)) for s in sites]
        closed, (noise, data) = jax.make_jaxpr(noise_and_data, return_shape=True)(*parts)
        jaxpr = closed.jaxpr
        outputs = iter(_output_sources(jaxpr, [{i} for i in range(len(jaxpr.invars))]))

        def names(tree):
            sources = set()
            for _ in jax.tree_util.tree_leaves(tree):
                sources |= next(outputs)
            return [sites[i].name for i in sorted(sources)]

        # the outputs come in the order noise_and_data returns them: all noise, then data
        noise_sources = [names(params) for params in noise]
        data_sources = [names(x) for x in data]
        return list(zip(noise_sources, data_sources, strict=True))

    return _cached(_LATENT_INPUTS_CACHE, key, find)


def _output_sources(jaxpr, input_sources: list[set]) -> list[set]:
    """Which inputs each output of ``jaxpr`` is computed from (sets of input indices).

    Every equation passes the union of its inputs' sources to its outputs, except the
    call-like ones (``jit``, ``custom_jvp_call``, ``checkpoint`` ...: an inner jaxpr with
    the equation's inputs and outputs), which are followed inside, so a jitted helper that
    returns the mean and the scale does not tie the scale to the mean's inputs."""

    def sources_of(v, derived):
        return set() if type(v).__name__ == "Literal" else derived.get(v, set())

    derived = dict(zip(jaxpr.invars, input_sources, strict=True))
    for eqn in jaxpr.eqns:
        ins = [sources_of(v, derived) for v in eqn.invars]
        if not any(ins):
            continue
        inner = next(
            (eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params),
            None,
        )
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
        if (
            inner is not None
            and hasattr(inner, "eqns")
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
        ):
            outs = _output_sources(inner, ins)
        else:
            union = set().union(*ins)
            outs = [union] * len(eqn.outvars)
        derived.update(zip(eqn.outvars, outs, strict=True))
    return [sources_of(v, derived) for v in jaxpr.outvars]


def _check_prior_parameters_somewhere_valid(names, checks) -> None:
    """Refuses a prior whose parameters, as the model computes them, are outside their
    range at every probe point: a constant built with jnp inside the model
    (``Gamma(jnp.array([1.0, -2.0]), 1.0)``, which NumPyro does not validate and trace
    time sees only as a traced value) or a hierarchy that never yields a valid prior.
    Every member would fail. Where a check fails at some points only, those members fail
    at run time. ``names``: (site, what) per check, from the tracer's discovery run;
    ``checks``: each check's result at the probe rows."""
    for (site, what), ok in zip(names, checks, strict=True):
        if not np.any(ok):
            raise ModelTracingError(
                f"latent site '{site}' has a prior whose parameters are outside their range "
                f"at every point the model was probed at ({what}). Every ensemble member "
                "would fail; give it parameters inside their ranges.",
                site,
            )


def _check_data_is_constant(problem: InverseProblem, data, structural, same) -> None:
    """Refuses an observed site whose value (``obs``) is computed from latent variables,
    such as ``obs=y - a * x``: NUTS can use such a residual form, but the ensemble methods
    need y fixed and the latents in the mean G(u), and would silently treat the value at
    one probe point as the data. ``data``: each site's value at the probe rows;
    ``structural``: the latents each site's value is computed from (the jaxpr walk)."""
    for k, site in enumerate(problem.observed_sites):
        x = np.asarray(data[k])
        varies = not all(same(x[row], x[0]) for row in range(1, x.shape[0]))
        if not varies and not structural[k]:
            continue
        culprits = [
            s.name for i, s in enumerate(problem.latent_sites) if not same(x[3 + i], x[1])
        ] or structural[k]
        names = ", ".join(repr(c) for c in culprits)
        raise ModelTracingError(
            f"the observed value (obs) of site '{site.name}' is computed from latent "
            f"variables ({names}): the ensemble methods need fixed data y and the latents "
            "in the mean, y ~ N(G(u), Γ). Move the latent terms into the distribution's "
            "mean (for obs=y - a * x with mean b, write the mean as b + a * x and obs=y).",
            site.name,
        )


def _probe(problem: InverseProblem, check_names):
    """One compiled, vmapped run of the model at u = 0, two random u and one perturbation
    of each latent site's slice. Returns each observed site's noise parameters and data.
    Raises where a prior's parameters are out of range at every point (``check_names``:
    the discovery run's names of :func:`~eki_infer.tracing.priors.prior_parameter_checks`),
    where an observed value is computed from latents, and where the noise changes with u
    or is computed from latents; warns about latent sites nothing depends on."""
    d = problem.dim
    rng = np.random.default_rng(20240531)
    u_a = rng.standard_normal(d)
    rows = [np.zeros(d), u_a, 1.5 * rng.standard_normal(d)]
    for s in problem.latent_sites:
        v = u_a.copy()
        v[s.start : s.stop] = rng.standard_normal(s.size) + 0.5
        rows.append(v)
    U = jnp.asarray(np.stack(rows), dtype=jnp.result_type(float))

    noise, data, latents, z, checks = jax.device_get(_compiled_probe(problem)(U))
    _check_prior_parameters_somewhere_valid(check_names, checks)

    def same(a, b):
        return np.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True)

    inputs = _latent_inputs(problem)
    _check_data_is_constant(problem, data, [of_data for _, of_data in inputs], same)
    structural = [of_noise for of_noise, _ in inputs]
    for k, site in enumerate(problem.observed_sites):
        params = [np.asarray(p) for p in noise[k]]
        if not all(same(p[row], p[0]) for p in params for row in (1, 2)):
            culprits = [
                s.name
                for i, s in enumerate(problem.latent_sites)
                if not all(same(p[3 + i], p[1]) for p in params)
            ] or structural[k]
            who = f" (it changes with {', '.join(repr(c) for c in culprits)})" if culprits else ""
            if culprits:
                fix = (
                    f"pass {culprits[0]} to the model as data, or "
                    f"numpyro.handlers.substitute(model, {{{culprits[0]!r}: value}})"
                )
            else:
                fix = "pass it to the model as data, or compute it without the latents"
            raise ModelTracingError(
                f"the noise (scale or covariance) of observed site '{site.name}' depends on "
                f"latent variables{who}. Learning the noise is not supported yet: Γ must be "
                f"known. Fix it to a value ({fix}), or estimate it beforehand.",
                site.name,
            )

    for site, culprits in zip(problem.observed_sites, structural, strict=True):
        if culprits:
            names = ", ".join(repr(c) for c in culprits)
            raise ModelTracingError(
                f"the noise (scale or covariance) of observed site '{site.name}' is computed "
                f"from latent variables ({names}). It took the same value at the points the "
                "model was probed at, but can change elsewhere, so Γ is not known. Learning "
                f"the noise is not supported yet: fix it to a value (pass it to the model as "
                "data, or compute it without the latents), or estimate it beforehand.",
                site.name,
            )

    for i, s in enumerate(problem.latent_sites):
        row = 3 + i
        moved = not np.array_equal(z[row], z[1])
        for j in range(len(problem.latent_sites)):
            if j != i and not np.array_equal(latents[j][row], latents[j][1]):
                moved = True
        if not moved:
            warn(
                f"latent site '{s.name}' influences neither the observed sites nor any "
                "other latent site: its posterior is its prior. If it is data, pass it "
                "to the model (a site with obs=None is sampled as a latent variable).",
            )
    return (
        [tuple(np.asarray(p)[0] for p in params) for params in noise],
        [np.asarray(x)[0] for x in data],
        ProbeSignature(digest_leaves(jax.tree_util.tree_leaves((noise, latents))), np.asarray(z)),
    )

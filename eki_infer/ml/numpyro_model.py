"""EKI as an *optimiser* for NumPyro models with non-Gaussian likelihoods.

:class:`~eki_infer.inference.EKIInference` calibrates models whose likelihood is
Gaussian with known noise, and its T = 1 tempering then approximates the posterior.
For a Categorical, Bernoulli, Poisson (or any other) likelihood that theory does not
hold, but loss-general EKI (Kovachki & Stuart 2019) still minimises the negative
log-likelihood

    Ψ(z, y) = −Σ_sites log p_site(y_site | z_site),

where the "forward output" z of a member is the set of **distribution objects** of the
observed sites (their parameter arrays: logits, probabilities, rates, ...) and ∇_z Ψ is
taken by ``jax.grad`` of the log-density alone — never through the model.
:class:`EKIOptimizer` does this. **The result is a point estimate, not a posterior**:
the ensemble's spread at the end says how far it collapsed, not how uncertain the
parameters are, and there is no stopping time with a Bayesian meaning.

How the model is read (a light tracer of its own, kept simple on purpose):

1. The model runs once under ``handlers.seed`` + ``handlers.trace`` to list the latent
   sample sites (in model order) and the observed ones.
2. Each latent site gets a block of whitened coordinates u (prior N(0, I)) of the size
   :func:`eki_infer.tracing.priors.whitened_shape` gives, and a member u is turned into
   a model run by ``handlers.substitute`` with value
   :func:`~eki_infer.tracing.priors.whitened_transform` (site's distribution, block of u),
   site by site — so priors that depend on earlier latents work, and any prior family
   the tracer supports works. The initial ensemble is drawn from N(0, I), i.e. the
   prior; re-spreading draws from it too.
3. The observed sites' distribution objects (JAX PyTrees) are the outputs; their
   floating-point leaves are what D sees.

Supported: latent sites of any continuous prior family the package's prior transform
supports, observed sites of any distribution with a ``log_prob`` (discrete or not), full
data (no subsampling plates), ``numpyro.deterministic`` sites (reported with the
parameters). With ``objective="posterior"`` the whitened prior term ½‖u‖² is added to Ψ
(the output is augmented with u), so the optimiser seeks the mode of the posterior
density of u — still an optimisation, still no uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from eki_infer.ml.losses import member_losses
from eki_infer.ml.training import eki_ml
from eki_infer.tracing.errors import ModelTracingError
from eki_infer.tracing.priors import whitened_shape, whitened_transform
from eki_infer.validation import check_count

__all__ = ["EKIOptimizer", "EKIOptimizerResult"]


class _Site(NamedTuple):
    name: str
    start: int
    size: int
    shape: tuple


class EKIOptimizerResult(NamedTuple):
    """What :meth:`EKIOptimizer.run` returns.

    Attributes:
        params: latent and deterministic site values at the mean particle ū.
        best_params: the same at the member with the lowest final loss.
        particles: the final ensemble in whitened space, ``(J, d)``.
        loss: the loss Ψ per step, ``(num_steps, J)`` (at the points D was evaluated).
        step_size: h_n per step, ``(num_steps,)``.
    """

    params: dict
    best_params: dict
    particles: jax.Array
    loss: np.ndarray
    step_size: np.ndarray


def _check_observation(name, fn, value):
    """Observed data must be finite and inside the support of their distribution (labels
    of a Categorical in 0..C−1, Bernoulli outcomes 0 or 1): outside it the
    log-likelihood is NaN or unbounded and EKI would optimise nonsense."""
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(value))):
        raise ModelTracingError(f"observed site '{name}' has NaN or inf data.", name)
    inside = np.asarray(fn.support(value))
    if not inside.all():
        example = ""
        if inside.shape == np.shape(value):  # elementwise support: show a few values
            example = f": e.g. {np.asarray(value)[~inside][:3].tolist()}"
        raise ModelTracingError(
            f"observed site '{name}' has data outside the support of its distribution "
            f"({type(fn).__name__}, support {fn.support}){example}.",
            name,
        )


class EKIOptimizer:
    """Loss-general EKI for a NumPyro model: minimises the negative log-likelihood of its
    observed sites (optimisation mode — **not** a posterior; see the module docstring).

    Args:
        model: a NumPyro model with continuous latent sites and observed sites of any
            distribution (Categorical, Bernoulli, Poisson, ...).
        ensemble_size: J (default 100).
        num_steps: number of EKI steps (default 200), each one forward run of the model
            per member on the full data.
        h, eps: adaptive step h_n = h / (‖D‖_F + ε) (defaults 1.0, 1e-8).
        momentum: ``None``, ``"nesterov"`` or a constant λ.
        respread: ``None`` or a γ(n) schedule (:func:`~eki_infer.ml.respread_schedule`).
        objective: ``"likelihood"`` (Ψ = −log-likelihood, default) or ``"posterior"``
            (adds ½‖u‖², the whitened prior).
        form: ``"explicit"`` or ``"kalman"`` (see :func:`~eki_infer.ml.loss_eki_update`).

    Example::

        opt = EKIOptimizer(logistic_model, ensemble_size=100, num_steps=200)
        result = opt.run(jax.random.PRNGKey(0), x, y=labels)
        result.params["w"]
    """

    def __init__(
        self,
        model: Callable,
        *,
        ensemble_size: int = 100,
        num_steps: int = 200,
        h: float = 1.0,
        eps: float = 1e-8,
        momentum=None,
        respread: Callable | None = None,
        objective: str = "likelihood",
        form: str = "explicit",
    ):
        if objective not in ("likelihood", "posterior"):
            raise ValueError(f"objective must be 'likelihood' or 'posterior', got {objective!r}.")
        check_count("ensemble_size", ensemble_size, 2)
        check_count("num_steps", num_steps)
        self.model = model
        self.ensemble_size = int(ensemble_size)
        self.num_steps = int(num_steps)
        self.objective = objective
        self._kernel_kwargs = dict(h=h, eps=eps, momentum=momentum, respread=respread, form=form)
        self.result: EKIOptimizerResult | None = None
        self.sites: list[_Site] = []

    # -------------------------------------------------------------------- tracing

    def _trace(self, rng_key, args, kwargs):
        trace = handlers.trace(handlers.seed(self.model, rng_key)).get_trace(*args, **kwargs)
        sites, observed, start = [], {}, 0
        for name, site in trace.items():
            if site["type"] == "plate":
                size, subsample = site["args"]
                if subsample is not None and subsample != size:
                    raise ModelTracingError(
                        f"plate '{name}' is subsampled (subsample_size={subsample} of {size}): "
                        "EKIOptimizer evaluates the likelihood on all the data at every "
                        "step (one subsample, fixed by the trace, would be optimised "
                        "instead); remove subsample_size.",
                        name,
                    )
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                _check_observation(name, site["fn"], site["value"])
                observed[name] = site["value"]
                continue
            shape = tuple(whitened_shape(site["fn"], name))
            size = math.prod(shape)
            sites.append(_Site(name, start, size, shape))
            start += size
        if not sites:
            raise ModelTracingError("The model has no latent sample site to optimise.")
        if not observed:
            raise ModelTracingError(
                "The model has no observed sample site: pass the data (obs=...) so that "
                "there is a likelihood to optimise."
            )
        return sites, observed, start

    def _runner(self, rng_key, args, kwargs):
        """u ↦ (latent and deterministic values, observed sites' distributions)."""
        sites = {s.name: s for s in self.sites}
        model = self.model

        def run(u):
            def value(msg):
                site = sites.get(msg["name"])
                if site is None or msg["type"] != "sample" or msg["is_observed"]:
                    return None
                block = u[site.start : site.start + site.size]
                return whitened_transform(msg["fn"], block, site.name)

            seeded = handlers.seed(model, rng_key)
            trace = handlers.trace(handlers.substitute(seeded, substitute_fn=value)).get_trace(
                *args, **kwargs
            )
            values, dists = {}, {}
            for name, site in trace.items():
                if site["type"] == "sample" and site["is_observed"]:
                    dists[name] = site["fn"]
                elif site["type"] in ("sample", "deterministic"):
                    values[name] = site["value"]
            return values, dists

        return run

    # ------------------------------------------------------------------------ run

    def run(self, rng_key, *args, **kwargs) -> EKIOptimizerResult:
        """Optimises the model's latent sites given the data in ``args``/``kwargs``.

        Returns:
            An :class:`EKIOptimizerResult` (also kept as ``self.result``).
        """
        k_trace, k_init, k_steps = jax.random.split(rng_key, 3)
        self.sites, observed, dim = self._trace(k_trace, args, kwargs)
        run = self._runner(k_trace, args, kwargs)
        augment = self.objective == "posterior"

        def forward(particles, x):
            del x
            dists = jax.vmap(lambda u: run(u)[1])(particles)
            return (dists, particles) if augment else dists

        def nll(z, y):
            dists = z[0] if augment else z
            total = sum(jnp.sum(dists[name].log_prob(y[name])) for name in y)
            value = -total
            if augment:
                value = value + 0.5 * jnp.sum(z[1] ** 2)
            return value

        kernel = eki_ml(nll, prior_scale=1.0, **self._kernel_kwargs)
        particles = jax.random.normal(k_init, (self.ensemble_size, dim))

        @jax.jit
        def optimise(key, particles):
            state = kernel.init(particles)

            def body(state, key):
                state, info = kernel.step(key, state, forward, None, observed)
                return state, (info.losses, info.step_size)

            keys = jax.random.split(key, self.num_steps)
            state, (losses, steps) = jax.lax.scan(body, state, keys)
            final = state.particles
            final_losses = member_losses(nll, forward(final, None), observed)
            return final, losses, steps, final_losses

        final, losses, steps, final_losses = optimise(k_steps, particles)
        if not (bool(jnp.all(jnp.isfinite(final))) and bool(jnp.any(jnp.isfinite(final_losses)))):
            bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(losses)), axis=1))
            where = f"from step {int(bad[0])} (of {self.num_steps})" if bad.size else "at the end"
            raise FloatingPointError(
                f"EKIOptimizer: the ensemble became non-finite (member losses non-finite "
                f"{where}). Check the model's output scale and the "
                "likelihood there, or lower h."
            )
        best = int(jnp.argmin(final_losses))
        values = jax.jit(lambda u: run(u)[0])
        self.result = EKIOptimizerResult(
            params=values(jnp.mean(final, axis=0)),
            best_params=values(final[best]),
            particles=final,
            loss=np.asarray(losses),
            step_size=np.asarray(steps),
        )
        return self.result

    def get_params(self, which: str = "mean") -> dict:
        """The optimised site values at the mean (``"mean"``) or best (``"best"``) member."""
        if self.result is None:
            raise RuntimeError("Call run() first.")
        if which not in ("mean", "best"):
            raise ValueError(f"which must be 'mean' or 'best', got {which!r}.")
        return self.result.params if which == "mean" else self.result.best_params

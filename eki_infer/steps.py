"""The driver's jitted per-iteration functions, compiled once per model structure.

Array leaves of the model's arguments (data, covariates, the observations) are passed to
the compiled functions as *dynamic* arguments; every other leaf (Python numbers,
strings, callables) is static and part of the cache key. A second ``run`` on new data of
the same shapes therefore reuses the compiled code instead of recompiling, and large
data are never baked into the program as constants.

All functions take and return arrays with a leading chain axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eki_infer.model_args import with_model_args

__all__ = ["CompiledSteps", "compile_steps"]


class CompiledSteps(NamedTuple):
    """Jitted functions; ``data`` is the tuple of dynamic argument leaves.

    init(keys (chains,)) -> (states, sched_states): the prior ensembles
    evaluate(states, data) -> (points, values, outputs, failed)
    advance(keys, states, sched_states, outputs, failed, y, noise)
        -> (states, sched_states, dt, (misfit_mean, misfit_sd))
    transform_and_forward(u (chains, n, d), data) -> (values, outputs)
    prior_transform(u (chains, n, d), data) -> values
    """

    init: object
    evaluate: object
    advance: object
    transform_and_forward: object
    prior_transform: object


def compile_steps(problem, process, scheduler, rebuild) -> CompiledSteps:
    """Builds the jitted functions for one model structure (``problem`` gives the sites;
    its arrays are replaced by the dynamic ``data`` at every call)."""

    def bind(data):
        return with_model_args(problem, rebuild, data)

    def over_chains(method):
        def f(u, data):
            return jax.vmap(jax.vmap(getattr(bind(data), method)))(u)

        return jax.jit(f)

    def evaluate(states, data):
        points = jax.vmap(process.points)(states)
        values, outputs = jax.vmap(jax.vmap(bind(data).transform_and_forward))(points)
        failed = ~jnp.all(jnp.isfinite(outputs), axis=-1)
        return points, values, outputs, failed

    def advance_chain(key, state, sched_state, outputs, failed, y, noise):
        residual = jnp.where(failed[:, None], 0.0, outputs - y)
        whitened = noise.whiten(residual)
        dt, sched_state = scheduler.next(sched_state, whitened, ~failed)
        safe_dt = jnp.where(jnp.isfinite(dt), dt, 0.0)
        state = process.update(key, state, outputs, failed, y, noise, safe_dt)
        misfit = 0.5 * jnp.sum(whitened**2, axis=-1)
        ok = ~failed
        count = jnp.maximum(jnp.sum(ok), 1)
        mean = jnp.sum(jnp.where(ok, misfit, 0.0)) / count
        var = jnp.sum(jnp.where(ok, (misfit - mean) ** 2, 0.0)) / jnp.maximum(count - 1, 1)
        return state, sched_state, dt, (mean, jnp.sqrt(var))

    def init(keys):
        states = jax.vmap(process.init, in_axes=(0, None))(keys, problem.dim)
        sched_states = jax.vmap(lambda _: scheduler.init())(keys)
        return states, sched_states

    def advance(keys, states, sched_states, outputs, failed, y, noise):
        return jax.vmap(advance_chain, in_axes=(0, 0, 0, 0, 0, None, None))(
            keys, states, sched_states, outputs, failed, y, noise
        )

    return CompiledSteps(
        init=jax.jit(init),
        evaluate=jax.jit(evaluate),
        advance=jax.jit(advance),
        transform_and_forward=over_chains("transform_and_forward"),
        prior_transform=over_chains("prior_transform"),
    )

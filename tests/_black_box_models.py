"""Shared by the black-box simulator tests and the kill-and-resume subprocess: an
exponential-decay model whose forward map exists as JAX code and as a NumPy simulator."""

import os
import time

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from eki_infer.simulators import black_box

TIMES = np.linspace(0.0, 2.0, 12)


def decay_numpy(rate, scale):
    """The simulator: plain NumPy, one member at a time."""
    return scale * np.exp(-rate * TIMES)


def slow_decay_numpy(rate, scale):
    time.sleep(0.01)
    return decay_numpy(rate, scale)


def flaky_decay_numpy(rate, scale):
    """Fails (raises or returns NaN) for about a fifth of the parameter space."""
    digit = int(abs(float(rate)) * 1e6) % 10
    if digit == 0:
        raise RuntimeError("solver diverged")
    if digit == 1:
        return np.full(TIMES.shape, np.nan)
    return decay_numpy(rate, scale)


def always_failing(rate, scale):
    raise RuntimeError("license server unreachable")


def ends_its_process(rate, scale):
    """Ends the worker process for rate > 2 (as a crash in compiled code would)."""
    if float(rate) > 2.0:
        os._exit(3)
    return decay_numpy(rate, scale)


def make_model(simulator=None):
    """The model; ``simulator=None`` uses the JAX forward map."""
    wrapped = None if simulator is None else black_box(simulator, output_shape=TIMES.shape)

    def model(y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
        scale = numpyro.sample("scale", dist.Normal(1.0, 0.3))
        if wrapped is None:
            mean = scale * jnp.exp(-rate * jnp.asarray(TIMES))
        else:
            mean = wrapped(rate, scale)
        numpyro.sample("y", dist.Normal(mean, 0.05).to_event(1), obs=y)

    return model


def observations():
    return decay_numpy(1.3, 0.9) + 0.05 * np.random.default_rng(0).normal(size=TIMES.shape)

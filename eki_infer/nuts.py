"""A NUTS run of the very same model, with its cost counted the way ensemble runs are.

Used by the demo, the comparison tools and the benchmarks: NumPyro's NUTS on the user's
model, returning the samples, the number of gradient evaluations (leapfrog steps, warmup
included, summed over chains) and the wall time, so the two can stand side by side.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

__all__ = ["NUTSResult", "run_nuts"]


class NUTSResult(NamedTuple):
    """Samples (site → (chains, draws, ...)), cost and the MCMC object itself."""

    samples: dict
    gradient_evaluations: int
    seconds: float
    mcmc: MCMC


def run_nuts(
    model,
    rng_key,
    *model_args,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 1,
    progress_bar: bool = False,
    init_strategy=None,
    **model_kwargs,
) -> NUTSResult:
    """Runs NUTS (NumPyro defaults otherwise) and counts every leapfrog step, warmup
    included: each one is one gradient evaluation of the log density.

    ``init_strategy`` is passed to ``NUTS`` (NumPyro's default, ``init_to_uniform``,
    when None); ``init_to_median`` keeps a chain out of minor modes far from the prior's
    bulk.
    """
    kernel = NUTS(model) if init_strategy is None else NUTS(model, init_strategy=init_strategy)
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential" if num_chains > 1 else "parallel",
        progress_bar=progress_bar,
    )
    start = time.perf_counter()
    warmup_key, sample_key = jax.random.split(rng_key)
    mcmc.warmup(
        warmup_key, *model_args, extra_fields=("num_steps",), collect_warmup=True, **model_kwargs
    )
    warmup_steps = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    mcmc.run(sample_key, *model_args, extra_fields=("num_steps",), **model_kwargs)
    sample_steps = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    jax.block_until_ready(samples)
    return NUTSResult(samples, warmup_steps + sample_steps, time.perf_counter() - start, mcmc)

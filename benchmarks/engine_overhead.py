"""Overhead of the EKIInference engine itself, beyond the forward-model evaluations.

Two measurements (issue: EKIInference):

1. A cheap jitted forward map (d = 10, M = 30, J = 100): wall time of a full EKI run
   after compilation, and the compile time (first run minus a repeat run on new data,
   which reuses the compiled steps).
2. A forward map of known cost (a fixed number of dense tanh layers, d = 10, M = 30):
   with small noise (σ = 0.002, so the data-misfit controller takes many steps); the
   cost of one batched evaluation of all J members is timed on its own, and the
   overhead ratio is the run time divided by (iterations + 1) × that batch cost.
   1.0 means the engine adds nothing; the target is ≤ 1.1.

Usage: ``python benchmarks/engine_overhead.py [--repeats 5]``; writes
``benchmarks/results/engine_overhead.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from eki_infer import EKIInference

RESULTS = Path(__file__).resolve().parent / "results"
D, M, J = 10, 30, 100


def make_problem(layers: int, width: int = 256, seed: int = 0, noise_scale: float = 0.1):
    """A model whose forward map costs ``layers`` dense (width × width) tanh layers."""
    rng = np.random.default_rng(seed)
    w_in = jnp.asarray(rng.normal(size=(D, width)) / np.sqrt(D))
    w_hidden = jnp.asarray(rng.normal(size=(max(layers, 1), width, width)) / np.sqrt(width))
    w_out = jnp.asarray(rng.normal(size=(width, M)) / np.sqrt(width))

    def forward(theta):
        h = jnp.tanh(theta @ w_in)

        def layer(h, w):
            return jnp.tanh(h @ w), None

        if layers > 0:
            h, _ = jax.lax.scan(layer, h, w_hidden[:layers])
        return h @ w_out

    def model(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        numpyro.sample("y", dist.Normal(forward(theta), noise_scale).to_event(1), obs=y)

    truth = jnp.asarray(rng.normal(size=D))
    y = forward(truth) + noise_scale * jnp.asarray(rng.normal(size=M))
    return model, forward, y


def time_batch(forward, repeats: int) -> float:
    """Seconds for one jitted, vmapped evaluation of J members (best of ``repeats``)."""
    batch = jax.jit(jax.vmap(forward))
    u = jax.random.normal(jax.random.PRNGKey(1), (J, D))
    batch(u).block_until_ready()
    best = np.inf
    for r in range(repeats):
        u = jax.random.normal(jax.random.PRNGKey(r + 2), (J, D))
        start = time.perf_counter()
        batch(u).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def time_runs(model, y, repeats: int):
    """(first run seconds, best repeat seconds, iterations) for EKI with DMC."""
    engine = EKIInference(model, "eki", ensemble_size=J, progress_bar=False)
    start = time.perf_counter()
    engine.run(jax.random.PRNGKey(0), y=y)
    first = time.perf_counter() - start
    best, iterations = np.inf, None
    for r in range(repeats):
        start = time.perf_counter()
        engine.run(jax.random.PRNGKey(r + 1), y=y + 1e-3 * r)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, iterations = elapsed, engine.history.t.shape[1]
    return first, best, iterations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=200, help="cost of the known-cost map")
    args = parser.parse_args(argv)
    numpyro.enable_x64()

    cheap_model, _, cheap_y = make_problem(layers=0)
    first, run, iterations = time_runs(cheap_model, cheap_y, args.repeats)
    cheap = {
        "d": D,
        "M": M,
        "J": J,
        "iterations": iterations,
        "first_run_s": first,
        "run_after_compile_s": run,
        "compile_s": first - run,
        "per_iteration_ms": 1e3 * run / iterations,
    }

    model, forward, y = make_problem(layers=args.layers, noise_scale=0.002)
    batch_s = time_batch(forward, args.repeats)
    _, run, iterations = time_runs(model, y, args.repeats)
    evaluations = (iterations + 1) * J
    costly = {
        "layers": args.layers,
        "batch_eval_ms": 1e3 * batch_s,
        "per_member_eval_ms": 1e3 * batch_s / J,
        "iterations": iterations,
        "forward_evaluations": evaluations,
        "run_s": run,
        "overhead_ratio": run / ((iterations + 1) * batch_s),
    }
    result = {
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "jax": jax.__version__,
        "cheap_forward": cheap,
        "known_cost_forward": costly,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_overhead.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Engine overhead (EKI, data-misfit controller, float64)",
        "",
        f"Machine: {result['machine']}; jax {jax.__version__}.",
        "",
        "| forward map | iterations | run after compile (s) | compile (s) | per iteration (ms) |",
        "| --- | --- | --- | --- | --- |",
        f"| cheap, d={D}, M={M}, J={J} | {cheap['iterations']} | {cheap['run_after_compile_s']:.3f}"
        f" | {cheap['compile_s']:.2f} | {cheap['per_iteration_ms']:.2f} |",
        "",
        "| known-cost map | batch of J (ms) | iterations | evaluations | run (s) | overhead |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {args.layers} tanh layers of 256 | {costly['batch_eval_ms']:.1f} | {iterations} | "
        f"{evaluations} | {run:.3f} | {costly['overhead_ratio']:.3f} |",
        "",
        "Overhead ratio = run time / ((iterations + 1) × time of one batched evaluation of all",
        "J members); the + 1 is the final evaluation of the posterior ensemble.",
    ]
    (RESULTS / "engine_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

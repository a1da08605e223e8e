"""Overhead of the EKIInference engine itself, beyond the forward-model evaluations.

Measurements (issue: EKIInference):

1. A cheap jitted forward map (d = 10, M = 30, J = 100): wall time of a full EKI run
   after compilation (median of the repeats), and the compile time (first run minus
   that; later runs on new data reuse the compiled steps).
2. A forward map of known cost (dense tanh layers sharing one 256 × 256 matrix, d = 10,
   M = 30) with small noise (σ = 0.002, so the data-misfit controller takes ~30 steps).
   The cost of one batched evaluation of all J members is timed on its own (best and
   median of 20 back-to-back evaluations, the best being the strictest denominator;
   with OpenBLAS limited to one thread, so that no threads left spinning by earlier
   factorisations slow it down), and the overhead ratio is the run time divided by
   (iterations + 1) × that cost. 1.0 means the engine adds nothing; the target is ≤ 1.1.
3. Where the run's time goes (both maps): the engine's compiled ``evaluate`` and
   ``advance`` calls, the per-run fixed cost (tracing the model, building the ArviZ
   object) and the rest (the host loop between steps), from wrappers around those
   functions that wait for each result. Both maps are run with the default
   ``blas_threads=1`` and with ``blas_threads=None`` (OpenBLAS's own thread count), the
   setting that decides how fast an evaluation runs right after an update
   (:mod:`eki_infer.blas_threads`).

Usage: ``python benchmarks/engine_overhead.py [--repeats 5] [--layers 200]``; writes
``benchmarks/results/engine_overhead.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import eki_infer.inference as engine_module
from eki_infer import EKIInference
from eki_infer.blas_threads import limited_blas_threads

RESULTS = Path(__file__).resolve().parent / "results"
D, M, J = 10, 30, 100


def make_problem(layers: int, width: int = 256, seed: int = 0, noise_scale: float = 0.1):
    """A model whose forward map costs ``layers`` dense (width × width) tanh layers.

    The layers share one weight matrix, so the map is compute-bound with cache-resident
    weights (0.5 MiB) and its cost does not depend on what ran before it. (With a
    separate matrix per layer, 105 MiB of weights, an evaluation right after another
    computation took ~1.7x the time of back-to-back evaluations on the same machine:
    that measures the memory system, not the engine.)
    """
    rng = np.random.default_rng(seed)
    w_in = jnp.asarray(rng.normal(size=(D, width)) / np.sqrt(D))
    w_hidden = jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width))
    w_out = jnp.asarray(rng.normal(size=(width, M)) / np.sqrt(width))

    def forward(theta):
        h = jnp.tanh(theta @ w_in)
        h = jax.lax.fori_loop(0, layers, lambda _, h: jnp.tanh(h @ w_hidden), h)
        return h @ w_out

    def model(y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        numpyro.sample("y", dist.Normal(forward(theta), noise_scale).to_event(1), obs=y)

    truth = jnp.asarray(rng.normal(size=D))
    y = forward(truth) + noise_scale * jnp.asarray(rng.normal(size=M))
    return model, forward, y


def time_batch(forward, repeats: int) -> tuple[float, float]:
    """Seconds for one jitted, vmapped evaluation of J members: (best, median) of
    ``max(repeats, 20)`` back-to-back evaluations on fresh inputs."""
    batch = jax.jit(jax.vmap(forward))
    u = jax.random.normal(jax.random.PRNGKey(1), (J, D))
    batch(u).block_until_ready()
    times = []
    for r in range(max(repeats, 20)):
        u = jax.random.normal(jax.random.PRNGKey(r + 2), (J, D))
        start = time.perf_counter()
        batch(u).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.min(times)), float(np.median(times))


class StepTimer:
    """Wraps the engine's compiled steps, its tracer and its ArviZ conversion so that
    each call's wall time (until its results are ready) is recorded by name."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self._originals = {}

    def _timed(self, name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = jax.block_until_ready(function(*args, **kwargs))
            self.seconds[name] += time.perf_counter() - start
            return result

        return wrapper

    def __enter__(self):
        compile_steps = engine_module.compile_steps

        def timed_compile(*args, **kwargs):
            steps = compile_steps(*args, **kwargs)
            return steps._replace(
                evaluate=self._timed("evaluate", steps.evaluate),
                advance=self._timed("advance", steps.advance),
            )

        self._originals = {
            "compile_steps": compile_steps,
            "trace_model": engine_module.trace_model,
            "_to_arviz": EKIInference._to_arviz,
        }
        engine_module.compile_steps = timed_compile
        engine_module.trace_model = self._timed("trace_model", engine_module.trace_model)
        EKIInference._to_arviz = self._timed("to_arviz", EKIInference._to_arviz)
        return self

    def __exit__(self, *exc):
        engine_module.compile_steps = self._originals["compile_steps"]
        engine_module.trace_model = self._originals["trace_model"]
        EKIInference._to_arviz = self._originals["_to_arviz"]


def time_runs(model, y, repeats: int, blas_threads):
    """Runs EKI (DMC) once to compile, then ``repeats`` times on perturbed data.

    Returns the first run's seconds and, for the median repeat, its seconds, its
    iterations and the split of its time (evaluate, advance, fixed, host loop).
    """
    with StepTimer() as timer:
        engine = EKIInference(
            model, "eki", ensemble_size=J, progress_bar=False, blas_threads=blas_threads
        )
        start = time.perf_counter()
        engine.run(jax.random.PRNGKey(0), y=y)
        first = time.perf_counter() - start
        runs = []
        for r in range(repeats):
            timer.seconds.clear()
            start = time.perf_counter()
            engine.run(jax.random.PRNGKey(r + 1), y=y + 1e-3 * r)
            elapsed = time.perf_counter() - start
            split = dict(timer.seconds)
            fixed = split.get("trace_model", 0.0) + split.get("to_arviz", 0.0)
            runs.append(
                {
                    "run_s": elapsed,
                    "iterations": int(engine.history.t.shape[1]),
                    "evaluate_s": split.get("evaluate", 0.0),
                    "advance_s": split.get("advance", 0.0),
                    "fixed_s": fixed,
                    "host_loop_s": elapsed
                    - fixed
                    - split.get("evaluate", 0.0)
                    - split.get("advance", 0.0),
                }
            )
    runs.sort(key=lambda run: run["run_s"] / (run["iterations"] + 1))
    return first, runs[len(runs) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=200, help="cost of the known-cost map")
    args = parser.parse_args(argv)
    numpyro.enable_x64()

    cheap_model, _, cheap_y = make_problem(layers=0)
    model, forward, y = make_problem(layers=args.layers, noise_scale=0.002)
    # The forward map's own cost, with no OpenBLAS threads left spinning by earlier
    # factorisations (it makes no BLAS calls itself): the same for both settings.
    with limited_blas_threads(1):
        batch_s, batch_median_s = time_batch(forward, args.repeats)
    cheap, costly = {}, {}
    for label, threads in (("blas_threads=1", 1), ("blas_threads=None", None)):
        first, run = time_runs(cheap_model, cheap_y, args.repeats, threads)
        cheap[label] = {
            **run,
            "first_run_s": first,
            "compile_s": first - run["run_s"],
            "per_iteration_ms": 1e3 * run["run_s"] / run["iterations"],
        }
        _, run = time_runs(model, y, args.repeats, threads)
        ideal = (run["iterations"] + 1) * batch_s
        costly[label] = {
            **run,
            "batch_eval_ms": 1e3 * batch_s,
            "batch_eval_median_ms": 1e3 * batch_median_s,
            "evaluate_in_run_ms": 1e3 * run["evaluate_s"] / (run["iterations"] + 1),
            "forward_evaluations": (run["iterations"] + 1) * J,
            "overhead_ratio": run["run_s"] / ideal,
            "overhead_ratio_vs_median": run["run_s"] / ((run["iterations"] + 1) * batch_median_s),
        }
    result = {
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "jax": jax.__version__,
        "layers": args.layers,
        "cheap_forward": cheap,
        "known_cost_forward": costly,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_overhead.json").write_text(json.dumps(result, indent=2))
    main_cheap = cheap["blas_threads=1"]
    lines = [
        "# Engine overhead (EKI, data-misfit controller, float64)",
        "",
        f"Machine: {result['machine']}; jax {jax.__version__}. Median of {args.repeats} runs "
        "after the compiling one.",
        "",
        "| forward map | iterations | run after compile (s) | compile (s) | per iteration (ms) |",
        "| --- | --- | --- | --- | --- |",
        f"| cheap, d={D}, M={M}, J={J} | {main_cheap['iterations']} | "
        f"{main_cheap['run_s']:.3f} | {main_cheap['compile_s']:.2f} | "
        f"{main_cheap['per_iteration_ms']:.2f} |",
        "",
        f"Known-cost map: {args.layers} tanh layers (one shared 256 × 256 matrix), d={D}, "
        f"M={M}, J={J}.",
        "",
        "| BLAS threads | batch of J alone, best / median (ms) | evaluate in run (ms) | "
        "iterations | evaluations | run (s) | overhead ratio (vs best / vs median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in costly.items():
        lines.append(
            f"| {label.split('=')[1]} | {row['batch_eval_ms']:.1f} / "
            f"{row['batch_eval_median_ms']:.1f} | {row['evaluate_in_run_ms']:.1f} | "
            f"{row['iterations']} | {row['forward_evaluations']} | {row['run_s']:.3f} | "
            f"{row['overhead_ratio']:.3f} / {row['overhead_ratio_vs_median']:.3f} |"
        )
    lines += [
        "",
        "Where a run's time goes (seconds; evaluate and advance are the compiled steps, fixed"
        " = tracing the model + building the ArviZ object, host loop = the rest):",
        "",
        "| map | BLAS threads | run | evaluate | advance | fixed | host loop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, table in (("cheap", cheap), ("known cost", costly)):
        for label, row in table.items():
            lines.append(
                f"| {name} | {label.split('=')[1]} | {row['run_s']:.3f} | "
                f"{row['evaluate_s']:.3f} | {row['advance_s']:.3f} | {row['fixed_s']:.3f} | "
                f"{row['host_loop_s']:.3f} |"
            )
    lines += [
        "",
        "Overhead ratio = run time / ((iterations + 1) × the time of one batched evaluation",
        "of all J members on its own: the best or the median of 20 back-to-back runs); the",
        "+ 1 is the final evaluation of the posterior ensemble. On a shared machine the best",
        "is optimistic (a quiet moment) while the run's evaluations see the average load.",
    ]
    (RESULTS / "engine_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

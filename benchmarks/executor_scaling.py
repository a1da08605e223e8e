"""Scale-out of black-box simulators: wall time against the ideal on 1, 2 and 4 workers.

A NumPy simulator that sleeps 50 ms per member (a stand-in for an expensive external
model) inside a NumPyro model; EKI with J = 64 members and a fixed step of 0.25 (four
updates, so 5 batches of 64 plus the tracer's probe). Each executor (threads, Dask
LocalCluster with single-threaded worker processes) runs on 1, 2 and 4 workers.

Ideal wall time = Σ over batches of ceil(batch / workers) × 50 ms (what a perfect
scheduler achieves with that many workers); efficiency = ideal / measured, target ≥ 0.87
(within 15 % of ideal). Sleep releases the GIL, so threads are a fair test of the
engine's dispatch; Dask adds serialisation and scheduling per task.

Usage: ``python benchmarks/executor_scaling.py [--members 64] [--delay 0.05]``; writes
``benchmarks/results/executor_scaling.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from eki_infer import EKIInference
from eki_infer.executors import DaskExecutor, ThreadExecutor
from eki_infer.schedulers import DefaultScheduler
from eki_infer.simulators import black_box

RESULTS = Path(__file__).resolve().parent / "results"
TIMES = np.linspace(0.0, 2.0, 16)


class SleepySimulator:
    """Exponential decay that sleeps ``delay`` seconds per call (picklable for Dask)."""

    def __init__(self, delay: float):
        self.delay = delay

    def __call__(self, rate, scale):
        time.sleep(self.delay)
        return scale * np.exp(-rate * TIMES)


def make_model(simulator):
    wrapped = black_box(simulator, output_shape=TIMES.shape)

    def model(y=None):
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
        scale = numpyro.sample("scale", dist.Normal(1.0, 0.3))
        numpyro.sample("y", dist.Normal(wrapped(rate, scale), 0.05).to_event(1), obs=y)

    return model


def batch_sizes(engine, num_probe_points: int, members: int) -> list[int]:
    iterations = engine.history.t.shape[1]
    return [num_probe_points] + [members] * (iterations + 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    numpyro.enable_x64()

    simulator = SleepySimulator(args.delay)
    model = make_model(simulator)
    y = 0.9 * np.exp(-1.3 * TIMES) + 0.05 * np.random.default_rng(0).normal(size=TIMES.shape)
    probe_points = 3 + 2  # the tracer's probe: u = 0, two random u, one per latent site

    rows = []
    for kind in ("threads", "dask"):
        for workers in args.workers:
            if kind == "threads":
                executor = ThreadExecutor(max_workers=workers)
            else:
                executor = DaskExecutor(n_workers=workers)
            with executor:
                engine = EKIInference(
                    model,
                    "eki",
                    ensemble_size=args.members,
                    scheduler=DefaultScheduler(0.25),
                    max_iterations=4,
                    executor=executor,
                    progress_bar=False,
                )
                engine.run(jax.random.PRNGKey(0), y=jnp.asarray(y))  # warm-up: compile, start
                start = time.perf_counter()
                engine.run(jax.random.PRNGKey(1), y=jnp.asarray(y))
                wall = time.perf_counter() - start
            sizes = batch_sizes(engine, probe_points, args.members)
            ideal = sum(math.ceil(n / workers) for n in sizes) * args.delay
            rows.append(
                {
                    "executor": kind,
                    "workers": workers,
                    "evaluations": sum(sizes),
                    "wall_s": wall,
                    "ideal_s": ideal,
                    "efficiency": ideal / wall,
                }
            )
            print(rows[-1])

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "executor_scaling.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"# Executor scaling: {args.delay * 1e3:.0f} ms per member, J = {args.members}",
        "",
        "| executor | workers | evaluations | wall (s) | ideal (s) | efficiency |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['executor']} | {r['workers']} | {r['evaluations']} | {r['wall_s']:.2f} | "
            f"{r['ideal_s']:.2f} | {r['efficiency']:.2f} |"
        )
    lines += [
        "",
        "ideal = Σ_batches ceil(batch / workers) × delay; efficiency = ideal / wall.",
    ]
    (RESULTS / "executor_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""SMC against the closed form as the dimension grows: posterior moments and log evidence.

The reference linear-Gaussian model (``models/linear_gaussian.py``: AR(1) prior, M = 200
data, noise sd 0.5, data from ``PRNGKey(0)``) at d = 5, 20, 30 and 50, each with 1000
particles and with the default count (:func:`eki_infer.smc.default_num_particles`: 100 d
beyond d = 10), several independent chains (SMC key ``PRNGKey(11)``), every other option
at its default; d = 5 also without the Kalman transport, which otherwise takes it to
t = 1 in one stage. Per run it reports the log-evidence error (mean ± standard error over
chains, and the chains' sd next to the independent-particle formula
sqrt(Σ_k (1/ESS_k − 1)/N) of ``eki_infer.smc``), the worst parameter's mean error in
posterior sds and sd error, the smallest stage effective sample size per dimension
(``history.sample_ess`` / d, the quantity SMC's small-population warning watches), the
forward evaluations per chain, and whether that warning fired.

Why: the moves are built from each stage's population statistics (a d × d covariance and
the parameter-output cross-covariance); with too few particles for d they are noisy and
tied to the particles they move, and the log evidence comes out biased (the reason the
default particle count grows with d).

Usage::

    python benchmarks/smc_dimension.py [--dims 5 20 30 50] [--chains 8]

writes ``benchmarks/results/smc_dimension.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import multivariate_normal  # noqa: E402

from eki_infer.smc import _MIN_ESS_PER_DIM, default_num_particles, run_smc  # noqa: E402
from eki_infer.tracing import trace_model  # noqa: E402
from models import linear_gaussian  # noqa: E402

jax.config.update("jax_enable_x64", True)
RESULTS = Path(__file__).resolve().parent / "results"
DATA = 200  # observations


def problem_and_exact(d: int):
    """The traced problem and its closed-form posterior moments and log evidence."""
    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0), d=d, M=DATA)
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    X, m0, S0, sigma = (np.asarray(a, dtype=np.float64) for a in args)
    log_z = multivariate_normal(X @ m0, X @ S0 @ X.T + np.diag(sigma**2)).logpdf(np.asarray(y))
    return trace_model(linear_gaussian.model, *args, y=y), mean, np.sqrt(np.diag(cov)), log_z


def measure(d: int, particles: int, chains: int, options: dict) -> dict:
    problem, mean, sd, log_z = problem_and_exact(d)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_smc(problem, jax.random.PRNGKey(11), particles, chains, **options)
    seconds = time.perf_counter() - start
    theta = np.asarray(jax.jit(problem.prior_transform)(result.particles)["theta"])
    errors = result.log_evidence - log_z
    h = result.history
    stage_ess = np.where(np.isnan(h.sample_ess), np.inf, h.sample_ess)
    formula = np.sqrt(np.sum(1.0 / h.ess - 1.0, axis=1) / particles)
    return {
        "d": d,
        "particles": particles,
        "chains": chains,
        "options": options,
        "log_evidence_errors": errors.tolist(),
        "mean_error": float(errors.mean()),
        "standard_error": float(errors.std(ddof=1) / np.sqrt(chains)),
        "sd_of_errors": float(errors.std(ddof=1)),
        "formula_sd": float(np.median(formula)),
        "worst_mean_error": float(np.max(np.abs(theta.mean(1) - mean) / sd)),
        "worst_sd_error": float(np.max(np.abs(theta.std(1) / sd - 1.0))),
        "min_stage_ess_per_dim": float(stage_ess.min() / d),
        "stages": int(h.t.shape[1]),
        "evaluations": float(np.mean(result.forward_evaluations)),
        "small_population_warning": any(
            "effective sample size fell" in str(w.message) for w in caught
        ),
        "seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[5, 20, 30, 50])
    parser.add_argument("--chains", type=int, default=8)
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    runs = []
    for d in opts.dims:
        sizes = sorted({1000, default_num_particles(d)})
        configs = [(n, {}) for n in sizes]
        if d <= 10:
            configs.append((1000, {"transport": False}))
        for particles, options in configs:
            row = measure(d, particles, opts.chains, options)
            runs.append(row)
            print(
                f"d={d} N={particles} {options}: log Z error {row['mean_error']:+.3f} "
                f"± {row['standard_error']:.3f}, mean err {row['worst_mean_error']:.3f}, "
                f"sd err {row['worst_sd_error']:.3f}, {row['seconds']:.0f} s",
                flush=True,
            )
    lines = [
        "# SMC against the closed form as the dimension grows",
        "",
        f"Generated by `benchmarks/smc_dimension.py`: the reference linear-Gaussian model "
        f"(AR(1) prior, M = {DATA}, noise sd 0.5, data PRNGKey(0)), {opts.chains} chains per "
        "run (SMC key PRNGKey(11)), other options at their defaults. Log evidence error: "
        "mean ± standard error over the chains; 'sd (formula)': the chains' sd of it and "
        "the independent-particle formula sqrt(Σ (1/ESS_k − 1)/N) (median over chains). "
        "Mean / sd error: the worst parameter over all chains, in posterior sds / as "
        "|sd ratio − 1|. Stage ESS / d: the smallest `history.sample_ess` over stages and "
        f"chains, per dimension (SMC warns below {_MIN_ESS_PER_DIM}). "
        f"x86_64 CPU, Python {platform.python_version()}, jax {jax.__version__}; "
        f"{time.perf_counter() - start:.0f} s wall (shared 2-core machine).",
        "",
        "| d | particles | options | log evidence error | sd (formula) | mean error "
        "| sd error | stage ESS / d | warned | stages | evaluations per chain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        shown = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        lines.append(
            f"| {r['d']} | {r['particles']} | {shown} "
            f"| {r['mean_error']:+.2f} ± {r['standard_error']:.2f} "
            f"| {r['sd_of_errors']:.2f} ({r['formula_sd']:.2f}) | {r['worst_mean_error']:.3f} "
            f"| {r['worst_sd_error']:.3f} | {r['min_stage_ess_per_dim']:.1f} "
            f"| {'yes' if r['small_population_warning'] else 'no'} | {r['stages']} "
            f"| {r['evaluations']:,.0f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smc_dimension.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "smc_dimension.json").write_text(json.dumps({"runs": runs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

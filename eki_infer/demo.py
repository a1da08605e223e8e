"""The demo: calibrate the exponential-sine model with EKI, EKS, UKI and NUTS side by side.

The model is the one of the EnsembleKalmanProcesses.jl learning-rate-scheduler study
(``models/exp_sine.py``): f(t) = exp(A sin t + v) on [0, 2π], priors A ~ N(2, 1),
v ~ N(0, 5²), and only the maximum and the mean of f observed with Γ = 0.1 I. The demo
prints, per method, the posterior mean and sd of each parameter, the number of
forward-model evaluations (EKI/EKS/UKI) or gradient evaluations (NUTS), and seconds,
then writes a figure of the marginals. The last row, "exact", is the posterior by
quadrature on a grid, restricted to the main mode (amplitude > 0): both observables are
even in the amplitude, so a mirror mode at −A holds a few percent of the mass; NUTS
starts at the prior median to stay out of it, and ensemble Kalman methods, being
Gaussian, cannot represent it.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import jax
import numpy as np
from numpyro.infer import init_to_median

from eki_infer.inference import EKIInference
from eki_infer.nuts import run_nuts

__all__ = ["load_reference_model", "run_demo"]


def load_reference_model(name: str):
    """Imports ``models.<name>`` from the source checkout (``models/`` is not installed;
    the README's commands run from the repository root, and an editable install keeps
    this file inside the checkout, so its parent folder is the fallback)."""
    try:
        return importlib.import_module(f"models.{name}")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "models").is_dir():
            raise
        sys.path.insert(0, str(root))
        return importlib.import_module(f"models.{name}")


def _summarise(samples: dict, names) -> dict:
    flat = {k: np.asarray(samples[k]).reshape(-1) for k in names}
    return {k: (float(v.mean()), float(v.std(ddof=1))) for k, v in flat.items()}


def run_demo(
    output_dir: str | Path = "demo_output",
    *,
    seed: int = 0,
    ensemble_size: int = 200,
    num_chains: int = 2,
    nuts_warmup: int = 1000,
    nuts_samples: int = 1000,
    progress_bar: bool = True,
    make_figure: bool = True,
) -> dict:
    """Runs the four methods on one simulated data set; returns the table as a dict
    (method → {"summary": {param: (mean, sd)}, "evaluations": n, "seconds": s})."""
    exp_sine = load_reference_model("exp_sine")
    key = jax.random.PRNGKey(seed)
    data_key, run_key = jax.random.split(key)
    args, y_obs = exp_sine.simulate_data(data_key)
    params = list(exp_sine.TRUE_PARAMS)

    results = {}
    samples_by_method = {}
    for method in ("eki", "eks", "uki"):
        # UKI is deterministic: one chain, with as many Gaussian draws as the others' members
        uki = method == "uki"
        engine = EKIInference(
            exp_sine.model,
            method=method,
            ensemble_size=None if uki else ensemble_size,
            num_chains=1 if uki else num_chains,
            num_samples=ensemble_size * num_chains if uki else ensemble_size,
            progress_bar=progress_bar,
        )
        start = time.perf_counter()
        engine.run(run_key, *args, y=y_obs)
        seconds = time.perf_counter() - start
        samples = engine.get_samples()
        samples_by_method[method.upper()] = samples
        results[method.upper()] = {
            "summary": _summarise(samples, params),
            "evaluations": int(engine.history.forward_evaluations[:, -1].sum())
            if engine.history.forward_evaluations.size
            else 0,
            "iterations": int(engine.history.t.shape[1]),
            "seconds": seconds,
        }

    nuts = run_nuts(
        exp_sine.model,
        run_key,
        *args,
        num_warmup=nuts_warmup,
        num_samples=nuts_samples,
        num_chains=1,
        init_strategy=init_to_median,
        y=y_obs,
    )
    samples_by_method["NUTS"] = nuts.samples
    results["NUTS"] = {
        "summary": _summarise(nuts.samples, params),
        "evaluations": nuts.gradient_evaluations,
        "iterations": nuts_warmup + nuts_samples,
        "seconds": nuts.seconds,
    }

    mean, cov = exp_sine.exact_posterior(*args, np.asarray(y_obs), main_mode_only=True)
    results["exact"] = {
        "summary": {p: (float(mean[i]), float(np.sqrt(cov[i, i]))) for i, p in enumerate(params)},
        "evaluations": 0,
        "iterations": 0,
        "seconds": 0.0,
    }
    print(format_table(results, params, exp_sine.TRUE_PARAMS))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if make_figure:
        path = plot_marginals(samples_by_method, params, output_dir / "exp_sine_marginals.png")
        print(f"figure written to {path}")
    return results


def format_table(results: dict, params, truth: dict) -> str:
    """A plain-text table: one row per method, mean ± sd per parameter, cost columns."""
    head = ["method", *[f"{p} (true {truth[p]:g})" for p in params]]
    head += ["evaluations", "iterations", "seconds"]
    rows = []
    for method, row in results.items():
        cells = [method]
        cells += [f"{row['summary'][p][0]:.3f} ± {row['summary'][p][1]:.3f}" for p in params]
        cells += [str(row["evaluations"]), str(row["iterations"]), f"{row['seconds']:.1f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    note = (
        "evaluations: forward-model evaluations (EKI/EKS/UKI, all chains) or gradient "
        "evaluations (NUTS leapfrog steps, warmup included)"
    )
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], note])


def plot_marginals(samples_by_method: dict, params, path: Path) -> Path:
    """Overlaid marginal histograms, one panel per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(5 * len(params), 3.6))
    for ax, param in zip(np.atleast_1d(axes), params, strict=True):
        for method, samples in samples_by_method.items():
            values = np.asarray(samples[param]).reshape(-1)
            ax.hist(values, bins=40, density=True, histtype="step", linewidth=1.6, label=method)
        ax.set_xlabel(param)
        ax.set_ylabel("density")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("Exponential-sine calibration: marginal posteriors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

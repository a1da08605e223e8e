"""Posterior accuracy and cost: every reference model × {EKI, EKS, UKI, SMC} against NUTS.

For each model in ``models/`` and each seed (data simulated with ``PRNGKey(seed)``;
eight schools uses the classic data, so its seeds vary the algorithms only):

- NUTS, NumPyro defaults (1000 warmup + 1000 draws, one chain), ``init_to_median``: the
  reference posterior and the reference cost (gradient evaluations = leapfrog steps,
  warmup included). For eight schools the reference is NUTS on the non-centred model
  (same posterior over mu, tau, theta; NUTS on the centred one has divergences).
- EKI (data-misfit controller to T = 1), EKS (ALDI, stable scheduler, 200 iterations),
  UKI (tempering to T = 1, posterior draws from its Gaussian) and SMC (the calibrated
  mode, ``method="smc"``, 1000 particles, defaults), one chain each; cost = forward
  evaluations that drive the updates (UKI's posterior draws and the final ensemble's
  evaluation feed only the posterior predictive and are not counted). SMC's own
  benchmark, ``smc_accuracy.py``, scores it against quadrature and long-NUTS references
  instead of this one-chain NUTS run.
- NumPyro's derivative-free ensemble samplers AIES and ESS at matched cost: their
  log-density evaluations, counted as NumPyro executes them, capped at EKI's forward
  evaluations for the same seed (walkers initialised from the prior, like EKI; the
  first half of the budget is warmup, the second half gives the draws of all walkers).
- Where there is a closed form: ``linear_gaussian`` (exact Gaussian posterior: every
  method, NUTS included, is also compared with 20 000 exact draws, and UKI's Gaussian is
  checked for exactness from its mean and covariance) and ``exp_sine`` (posterior
  moments of the main mode by quadrature).

Metrics (``eki_infer.compare``): per scalar parameter the error of the mean in
reference-sd units, the sd ratio, W1 of the marginals in reference-sd units; the energy
distance of the joint draws scaled by the reference sd. The table gives, per model and
method, the median over seeds of the worst parameter (and the worst seed).

Usage::

    python benchmarks/posterior_accuracy.py [--small] [--models sir darcy] [--seeds 3]

writes ``benchmarks/results/posterior_accuracy.md`` and ``.json`` (``--small``:
``posterior_accuracy_small.*``, tiny sizes, for a smoke test). JAX compilations are kept
in a persistent cache (``--jax-cache``, default a folder in the temp directory), so
repeated seeds and repeated runs skip most compilation; the first seed of each model
pays it, which is why the tables give medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro.infer import AIES, ESS, MCMC, init_to_median, init_to_sample  # noqa: E402

from eki_infer import EKIInference  # noqa: E402
from eki_infer.compare import MethodRun, compare  # noqa: E402
from eki_infer.nuts import run_nuts  # noqa: E402
from models import REFERENCE_MODELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("EKI", "EKS", "UKI", "SMC", "AIES", "ESS")

# Ensemble sizes: J = 1000 on the linear-Gaussian model (the target), 200 members
# elsewhere (Monte-Carlo error of a mean ~ 1/sqrt(J) = 0.07 sd, of an sd ~ 5 %, and
# J ≥ 20 d for every model here). EKS runs 200 iterations with J = 100.
FULL = {
    "eki_J": {"linear_gaussian": 1000, "default": 200},
    "eks_J": 100,
    "eks_iterations": 200,
    "uki_draws": 4000,
    "smc_N": 1000,
    "nuts_warmup": 1000,
    "nuts_samples": 1000,
    "nuts_reference_samples": 3000,
    "exact_draws": 20000,
    "grid_size": 240,
}
SMALL = {
    "eki_J": {"linear_gaussian": 200, "default": 50},
    "eks_J": 30,
    "eks_iterations": 20,
    "uki_draws": 500,
    "smc_N": 200,
    "nuts_warmup": 150,
    "nuts_samples": 150,
    "nuts_reference_samples": 300,
    "exact_draws": 2000,
    "grid_size": 60,
}
TARGET_MODELS = {"near_gaussian": ("sir", "darcy")}


# ----------------------------------------------------------------------------- peers


class _Counter:
    def __init__(self):
        self.count = 0

    def add(self, n):
        self.count += int(n)


def _counting(kernel_cls):
    """A subclass of an ensemble kernel whose batched log density counts its rows (every
    row it evaluates, as NumPyro executes it) in ``self.counter``."""

    class Counting(kernel_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counter = _Counter()

        def _init_state(self, rng_key, model_args, model_kwargs, init_params):
            out = super()._init_state(rng_key, model_args, model_kwargs, init_params)
            inner, counter = self._batch_log_density, self.counter

            def counted(z):
                jax.debug.callback(counter.add, jnp.asarray(z.shape[0]))
                return inner(z)

            self._batch_log_density = counted
            return out

    Counting.__name__ = f"Counting{kernel_cls.__name__}"
    return Counting


def run_peer(name, model, rng_key, args, y, budget, dim):
    """AIES or ESS with about ``budget`` log-density evaluations in all (warmup included).

    Every row the sampler's batched log density evaluates is counted. AIES evaluates 2
    rows per walker and step (the proposal and, again, the current point), so its steps
    follow from the budget: half warmup, half sampling. ESS's cost per step varies
    (slice stepping-out and shrinking): the warmup is sized to half the budget at a guess
    of 20 rows per walker and step, its actual rate is measured, and the sampling phase
    gets the rest of the budget at that rate (so its total can miss the budget a little,
    and exceeds it when even the shortest warmup costs more). The draws are the walkers'
    positions over the sampling phase.
    """
    walkers = max(8, 2 * dim)
    walkers += walkers % 2
    kernel = _counting(AIES if name == "AIES" else ESS)(model, init_strategy=init_to_sample)
    per_step = (2 if name == "AIES" else 20) * walkers
    warmup = max(2, (budget // 2) // per_step)
    samples = max(2, (budget - warmup * per_step) // per_step)
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=walkers,
        chain_method="vectorized",
        progress_bar=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "AIES":
            mcmc.run(rng_key, *args, y=y)
        else:
            mcmc.warmup(rng_key, *args, y=y)
            jax.block_until_ready(mcmc.post_warmup_state)
            used = kernel.counter.count
            rate = max(used / warmup, 1.0)
            mcmc.num_samples = max(2, int(0.8 * (budget - used) // rate))
            mcmc.run(jax.random.fold_in(rng_key, 1), *args, y=y)
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    return MethodRun.from_chains(
        draws,
        evaluations=kernel.counter.count,
        kind="log_density",
        seconds=seconds,
        note=f"{name}, {walkers} walkers × ({warmup} warmup + {mcmc.num_samples}) steps",
    )


# ----------------------------------------------------------------------------- runs


def run_engine(method, model, rng_key, args, y, size, config, **extra):
    kwargs = {"num_chains": 1, "progress_bar": False, "num_samples": config["uki_draws"], **extra}
    if method == "eki":
        kwargs["ensemble_size"] = size
    elif method == "eks":
        kwargs["ensemble_size"] = config["eks_J"]
        kwargs["max_iterations"] = config["eks_iterations"]
    elif method == "smc":
        kwargs["ensemble_size"] = config["smc_N"]
    engine = EKIInference(model, method=method, **kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.run(rng_key, *args, y=y)
    seconds = time.perf_counter() - start
    history = engine.history
    iterations = history.t.shape[1]
    note = method.upper()
    if method == "smc":
        draws = engine.get_samples(group_by_chain=True)
        draws = next(iter(draws.values())).shape[1]
        note += (
            f", N = {engine.ensemble_size} particles, {iterations} stages (the last: the "
            f"chains' extension at t = 1), {draws} draws"
        )
    else:
        if method != "uki":
            note += f", J = {engine.ensemble_size}"
        note += f", {iterations} iterations, final t = {float(history.t[0, -1]):.3g}"
    run = MethodRun(
        engine.get_samples(),
        int(history.forward_evaluations[:, -1].sum()),
        "forward",
        seconds,
        note,
    )
    return engine, run


def uki_exactness(engine, mean, cov):
    """Largest error of UKI's Gaussian (pushed through the affine prior transform) against
    the exact posterior: |mean error| / sd and |sd ratio − 1|, no sampling involved."""
    state = engine.final_state
    m_u, c_u = np.asarray(state.mean)[0], np.asarray(state.cov)[0]
    t_mean = np.asarray(_flat_theta(engine, jnp.asarray(m_u)))
    jac = np.asarray(jax.jacfwd(lambda u: _flat_theta(engine, u))(jnp.asarray(m_u)))
    t_cov = jac @ c_u @ jac.T
    sd = np.sqrt(np.diag(cov))
    return {
        "max_abs_mean_error": float(np.max(np.abs(t_mean - mean) / sd)),
        "max_abs_sd_ratio_minus_1": float(np.max(np.abs(np.sqrt(np.diag(t_cov)) / sd - 1.0))),
        "max_abs_cov_error": float(np.max(np.abs(t_cov - cov)) / np.max(np.abs(cov))),
    }


def _flat_theta(engine, u):
    return jnp.ravel(engine.problem.prior_transform(u)["theta"])


def moment_errors(comparison_draws, names, mean, cov):
    """Per method: worst |mean error| / sd and |sd ratio − 1| against exact moments."""
    sd = np.sqrt(np.diag(cov))
    out = {}
    for method, draws in comparison_draws.items():
        out[method] = {
            "max_abs_mean_error": float(np.max(np.abs(draws.mean(axis=0) - mean) / sd)),
            "max_abs_sd_ratio_minus_1": float(np.max(np.abs(draws.std(axis=0, ddof=1) / sd - 1.0))),
        }
    return out


def run_model(name, seed, config, log):
    module = REFERENCE_MODELS[name]
    data_key = jax.random.PRNGKey(seed)
    run_key = jax.random.fold_in(jax.random.PRNGKey(12345), seed)
    args, y = module.simulate_data(data_key)
    nuts_model = getattr(module, "model_noncentered", module.model)
    size = config["eki_J"].get(name, config["eki_J"]["default"])

    t0 = time.perf_counter()
    # The reference posterior uses more draws than NumPyro's default run (less Monte-Carlo
    # error in the yardstick); the cost reported is that of the default run: the warmup
    # plus the first ``nuts_samples`` draws' leapfrog steps (seconds pro rata).
    nuts = run_nuts(
        nuts_model,
        jax.random.fold_in(run_key, 0),
        *args,
        y=y,
        num_warmup=config["nuts_warmup"],
        num_samples=config["nuts_reference_samples"],
        init_strategy=init_to_median,
    )
    extra = nuts.mcmc.get_extra_fields()
    divergences = int(np.sum(np.asarray(extra.get("diverging", 0))))
    steps = np.asarray(extra["num_steps"])
    default_cost = int(nuts.gradient_evaluations - steps[config["nuts_samples"] :].sum())
    nuts_run = MethodRun.from_chains(
        nuts.samples,
        evaluations=default_cost,
        kind="gradient",
        seconds=nuts.seconds * default_cost / nuts.gradient_evaluations,
        note=(
            f"NUTS {config['nuts_warmup']} + {config['nuts_reference_samples']} draws as the "
            f"reference (cost of {config['nuts_warmup']} + {config['nuts_samples']})"
        ),
    )
    log(
        f"  NUTS: {default_cost} gradient evaluations for {config['nuts_warmup']} + "
        f"{config['nuts_samples']} ({nuts.gradient_evaluations} in all), {nuts.seconds:.1f} s"
    )

    runs, engines = {}, {}
    for k, method in enumerate(("eki", "eks", "uki", "smc")):
        engine, run = run_engine(
            method, module.model, jax.random.fold_in(run_key, k + 1), args, y, size, config
        )
        runs[method.upper()], engines[method.upper()] = run, engine
        log(f"  {run.note}: {run.evaluations} forward evaluations, {run.seconds:.1f} s")
    dim = int(engines["EKI"].problem.dim)
    budget = runs["EKI"].evaluations
    for k, peer in enumerate(("AIES", "ESS")):
        runs[peer] = run_peer(
            peer, module.model, jax.random.fold_in(run_key, 10 + k), args, y, budget, dim
        )
        peer_run = runs[peer]
        log(f"  {peer_run.note}: {peer_run.evaluations} evaluations, {peer_run.seconds:.1f} s")

    comparison = compare(results=runs, reference=nuts_run)
    out = {
        "seed": seed,
        "dim": dim,
        "nuts_divergences": divergences,
        "comparison": comparison.to_dict(),
        "total_seconds": time.perf_counter() - t0,
    }
    if name == "linear_gaussian":
        mean, cov = module.exact_posterior(*args, y)
        draws = np.random.default_rng(seed).multivariate_normal(mean, cov, config["exact_draws"])
        exact = MethodRun({"theta": draws}, note="closed form, exact draws")
        _, transform = run_engine(
            "eki",
            module.model,
            jax.random.fold_in(run_key, 20),
            args,
            y,
            size,
            config,
            eki_variant="transform",
        )
        vs_exact = compare(
            results={
                **runs,
                "EKI (transform)": transform,
                "NUTS": MethodRun.from_chains(nuts.samples),
            },
            reference=exact,
            reference_name="exact",
        )
        out["vs_exact"] = vs_exact.to_dict()["summary"]
        out["uki_gaussian_vs_exact"] = uki_exactness(engines["UKI"], mean, cov)
    elif name == "exp_sine":
        mean, cov = module.exact_posterior(*args, y, main_mode_only=True)
        names = list(comparison.parameters)
        order = [names.index(p) for p in ("amplitude", "vertical_shift")]
        draws = {k: v[:, order] for k, v in comparison.draws.items()}
        out["vs_exact"] = moment_errors(draws, names, mean, cov)
        out["mirror_mode_mass"] = {k: float(np.mean(v[:, 0] < 0)) for k, v in draws.items()}
    elif name in GRID_BOXES:
        sites, box = GRID_BOXES[name]
        mean, cov = grid_moments(module.model, args, y, sites, box, config["grid_size"])
        names = list(comparison.parameters)
        order = [names.index(p) for p in sites]
        draws = {k: v[:, order] for k, v in comparison.draws.items()}
        out["vs_exact"] = moment_errors(draws, names, mean, cov)
        out["grid_moments"] = {"mean": mean.tolist(), "sd": np.sqrt(np.diag(cov)).tolist()}
    return out


# Two-parameter models without a closed form: posterior moments by quadrature on a grid
# (the box holds all but a negligible fraction of the posterior mass for the seeds used).
GRID_BOXES = {"lorenz96": (("forcing", "damping"), ((5.0, 12.0), (0.5, 1.8)))}


def grid_moments(model, args, y, sites, box, size):
    """Posterior mean and covariance of two scalar sites by quadrature on a size² grid."""
    from numpyro.infer.util import log_density

    a = jnp.linspace(*box[0], size)
    b = jnp.linspace(*box[1], size)

    def log_post(u, v):
        return log_density(model, args, {"y": y}, {sites[0]: u, sites[1]: v})[0]

    grid = np.asarray(jax.jit(jax.vmap(lambda u: jax.vmap(lambda v: log_post(u, v))(b)))(a))
    grid = np.where(np.isfinite(grid), grid, -np.inf)
    w = np.exp(grid - grid.max())
    w /= w.sum()
    A, B = np.meshgrid(np.asarray(a), np.asarray(b), indexing="ij")
    mean = np.array([np.sum(w * A), np.sum(w * B)])
    da, db = A - mean[0], B - mean[1]
    cov = np.array(
        [[np.sum(w * da * da), np.sum(w * da * db)], [np.sum(w * da * db), np.sum(w * db * db)]]
    )
    return mean, cov


# ----------------------------------------------------------------------------- report


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def aggregate(per_seed):
    """model → method → medians and worst values over seeds."""
    table = {}
    for name, seeds in per_seed.items():
        rows = {}
        for method in (*METHODS, "NUTS"):
            if method == "NUTS":
                entries = [
                    {**s["comparison"]["noise_floor"], **s["comparison"]["cost"]["NUTS"]}
                    for s in seeds
                ]
            else:
                entries = [s["comparison"]["summary"][method] for s in seeds]
            row = {}
            for key in (
                "max_abs_mean_error",
                "max_abs_sd_ratio_minus_1",
                "mean_w1_sd",
                "energy_distance",
                "evaluations",
                "seconds",
                "fraction_of_reference",
            ):
                values = [e.get(key) for e in entries]
                row[key] = _median(values)
                if key.startswith("max_abs"):
                    row[key + "_worst"] = max(v for v in values if v is not None)
            rows[method] = row
        for extra in ("vs_exact",):
            if extra in seeds[0]:
                rows[extra] = {
                    m: {
                        k: max(s[extra][m][k] for s in seeds)
                        for k in ("max_abs_mean_error", "max_abs_sd_ratio_minus_1")
                    }
                    for m in seeds[0][extra]
                }
        if "uki_gaussian_vs_exact" in seeds[0]:
            rows["uki_gaussian_vs_exact"] = {
                k: max(s["uki_gaussian_vs_exact"][k] for s in seeds)
                for k in seeds[0]["uki_gaussian_vs_exact"]
            }
        if "mirror_mode_mass" in seeds[0]:
            rows["mirror_mode_mass"] = {
                m: _median([s["mirror_mode_mass"][m] for s in seeds])
                for m in seeds[0]["mirror_mode_mass"]
            }
        rows["dim"] = seeds[0]["dim"]
        rows["nuts_divergences"] = [s["nuts_divergences"] for s in seeds]
        rows["notes"] = seeds[-1]["comparison"]["notes"]
        table[name] = rows
    return table


def check_targets(table):
    """The issue's targets, each with the measured value (worst over seeds)."""
    checks = []

    def add(label, value, limit, ok=None):
        ok = (value is not None and value <= limit) if ok is None else ok
        checks.append({"target": label, "value": value, "limit": limit, "met": bool(ok)})

    if "linear_gaussian" in table:
        t = table["linear_gaussian"]
        ex = t.get("vs_exact", {}).get("EKI")
        if ex:
            add("linear_gaussian EKI vs exact: |mean err| ≤ 0.1 sd", ex["max_abs_mean_error"], 0.1)
            add(
                "linear_gaussian EKI vs exact: |sd ratio − 1| ≤ 0.1",
                ex["max_abs_sd_ratio_minus_1"],
                0.1,
            )
        ug = t.get("uki_gaussian_vs_exact")
        if ug:
            add(
                "linear_gaussian UKI Gaussian exact (|mean err|, sd units)",
                ug["max_abs_mean_error"],
                1e-6,
            )
            add(
                "linear_gaussian UKI Gaussian exact (|sd ratio − 1|)",
                ug["max_abs_sd_ratio_minus_1"],
                1e-6,
            )
    for name in TARGET_MODELS["near_gaussian"]:
        if name not in table:
            continue
        for method in ("EKI", "UKI"):
            row = table[name][method]
            add(
                f"{name} {method} vs NUTS: |mean err| ≤ 0.2 sd",
                row["max_abs_mean_error_worst"],
                0.2,
            )
            add(
                f"{name} {method} vs NUTS: |sd ratio − 1| ≤ 0.2",
                row["max_abs_sd_ratio_minus_1_worst"],
                0.2,
            )
    for name, rows in table.items():
        frac = rows["EKI"]["fraction_of_reference"]
        add(f"{name} EKI forward evaluations ≤ 5 % of NUTS gradient evaluations", frac, 0.05)
    return checks


def _fmt(x, digits=2):
    if x is None:
        return "–"
    if abs(x) >= 1e5:
        return f"{x:.1e}"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 10):
        return f"{x:,.0f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"


def markdown(table, checks, meta):
    lines = [
        "# Posterior accuracy and cost against NUTS",
        "",
        f"Generated by `benchmarks/posterior_accuracy.py` ({meta['mode']}), seeds "
        f"{meta['seeds']}, {meta['platform']}; total {meta['total_seconds']:.0f} s wall. "
        "The machine was shared with other jobs: seconds are noisy (and include JAX "
        "compilation where the persistent cache was cold, mostly the first seed).",
        "",
        "Errors are against NUTS (one chain, 1000 warmup + 3000 draws for a steadier "
        "reference; its cost is counted for NumPyro's default 1000 + 1000; eight schools: "
        "non-centred NUTS), in NUTS-posterior-sd units, for the worst parameter: the median "
        "over seeds, and the worst seed in brackets. W1: mean over parameters of the "
        "marginal 1-Wasserstein distance / sd. Energy: energy distance of the joint draws "
        "scaled by the NUTS sd. The NUTS rows give, in the error columns, the same measures "
        "between the two halves of the NUTS draws: the noise floor of the reference. "
        "Evaluations: forward-model runs (EKI/EKS/UKI/SMC), log-density evaluations "
        "(AIES/ESS, capped at EKI's count) or gradient evaluations (NUTS, warmup "
        "included); % = of NUTS's.",
        "",
        f"Settings: {meta['settings']}",
        "",
        "| model (d) | method | max \\|mean err\\| | max \\|sd ratio − 1\\| | W1 | energy "
        "| evaluations | % of NUTS | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in table.items():
        for i, method in enumerate((*METHODS, "NUTS")):
            r = rows[method]
            label = f"{name} ({rows['dim']})" if i == 0 else ""
            pct = r["fraction_of_reference"]
            lines.append(
                f"| {label} | {method} "
                f"| {_fmt(r['max_abs_mean_error'])} ({_fmt(r['max_abs_mean_error_worst'])}) "
                f"| {_fmt(r['max_abs_sd_ratio_minus_1'])} "
                f"({_fmt(r['max_abs_sd_ratio_minus_1_worst'])}) "
                f"| {_fmt(r['mean_w1_sd'])} | {_fmt(r['energy_distance'], 3)} "
                f"| {_fmt(r['evaluations'])} | {'–' if pct is None else f'{100 * pct:.1f}'} "
                f"| {_fmt(r['seconds'], 1)} |"
            )
    exact_models = [n for n in table if "vs_exact" in table[n]]
    if exact_models:
        lines += [
            "",
            "## Against the exact posterior",
            "",
            "linear_gaussian: closed form (20 000 exact draws as the reference; "
            "'EKI (transform)' is the deterministic square-root variant, without the "
            "perturbed observations' extra noise); exp_sine: moments of the main mode "
            "(amplitude > 0) by quadrature; lorenz96: moments by quadrature on a grid. "
            "Worst parameter, worst seed.",
            "",
            "| model | method | max \\|mean err\\| | max \\|sd ratio − 1\\| |",
            "|---|---|---|---|",
        ]
        for name in exact_models:
            for i, (method, r) in enumerate(table[name]["vs_exact"].items()):
                lines.append(
                    f"| {name if i == 0 else ''} | {method} | {_fmt(r['max_abs_mean_error'])} "
                    f"| {_fmt(r['max_abs_sd_ratio_minus_1'])} |"
                )
        ug = table.get("linear_gaussian", {}).get("uki_gaussian_vs_exact")
        if ug:
            lines += [
                "",
                "UKI's Gaussian itself (mean and covariance, no sampling) on linear_gaussian: "
                f"max |mean err| {ug['max_abs_mean_error']:.1e} sd, max |sd ratio − 1| "
                f"{ug['max_abs_sd_ratio_minus_1']:.1e}, max |ΔΣ| / max |Σ| "
                f"{ug['max_abs_cov_error']:.1e} (the UKI rows above include the Monte-Carlo "
                "error of its draws).",
            ]
        mm = table.get("exp_sine", {}).get("mirror_mode_mass")
        if mm:
            lines += [
                "",
                "exp_sine, fraction of draws in the mirror mode (amplitude < 0; the exact "
                "posterior puts ~2 % there): "
                + ", ".join(f"{k} {100 * v:.1f} %" for k, v in mm.items()),
            ]
    lines += [
        "",
        "## Targets (issue 5), worst seed",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    for c in checks:
        value = "–" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(
            f"| {c['target']} | {value} | {c['limit']:g} | {'yes' if c['met'] else 'no'} |"
        )
    lines += ["", "## Run details (last seed)", ""]
    for name, rows in table.items():
        notes = "; ".join(f"{v}" for v in rows["notes"].values())
        lines.append(f"- {name}: {notes}; NUTS divergences per seed {rows['nuts_divergences']}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument(
        "--jax-cache",
        default=str(Path(tempfile.gettempdir()) / "eki_infer_jax_cache"),
        help="persistent JAX compilation cache ('' to disable)",
    )
    parser.add_argument("--output", default=None, help="basename under benchmarks/results")
    opts = parser.parse_args(argv)

    numpyro.enable_x64()
    if opts.jax_cache:
        jax.config.update("jax_compilation_cache_dir", opts.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    config = SMALL if opts.small else FULL
    unknown = set(opts.models) - set(REFERENCE_MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(REFERENCE_MODELS)}")

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    per_seed = {}
    for name in opts.models:
        per_seed[name] = []
        for seed in range(opts.seeds):
            log(f"{name}, seed {seed}")
            per_seed[name].append(run_model(name, seed, config, log))
    table = aggregate(per_seed)
    checks = check_targets(table)
    sizes = ", ".join(f"{k} {v}" for k, v in config["eki_J"].items())
    meta = {
        "mode": "small" if opts.small else "full",
        "seeds": list(range(opts.seeds)),
        "platform": f"{platform.machine()} CPU ×{os.cpu_count()}, Python "
        f"{platform.python_version()}, jax {jax.__version__}, numpyro {numpyro.__version__}",
        "total_seconds": time.perf_counter() - start,
        "settings": f"EKI J = ({sizes}), EKS J = {config['eks_J']} × "
        f"{config['eks_iterations']} iterations, UKI {config['uki_draws']} draws, SMC "
        f"{config['smc_N']} particles (defaults), "
        f"NUTS {config['nuts_warmup']} + {config['nuts_reference_samples']} (cost counted "
        f"for {config['nuts_warmup']} + {config['nuts_samples']}), one chain each; AIES/ESS "
        "walkers max(8, 2d).",
        "config": config,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = opts.output or ("posterior_accuracy_small" if opts.small else "posterior_accuracy")
    payload = {"meta": meta, "table": table, "targets": checks, "per_seed": per_seed}
    (RESULTS / f"{base}.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    text = markdown(table, checks, meta)
    (RESULTS / f"{base}.md").write_text(text)
    print(text)


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


if __name__ == "__main__":
    main()

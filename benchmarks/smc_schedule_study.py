"""Tempering schedule of ``run_smc``: effective sample size (ESS) vs data-misfit controller.

``run_smc(schedule="ess")`` picks each Δt by bisection so that the ESS of the incremental
weights is ``ess_target`` (0.5) times its Δt → 0⁺ value; ``schedule="dmc"`` takes the
data-misfit controller's step (Iglesias & Yang 2021, the EKI default):
Δt = min(max(M/(2⟨Φ⟩), sqrt(M/(2 Var Φ))), 1 − t) from the equally weighted population's
misfits. Everything else (moves, stopping rule, particles) is the same.

For every reference model, seed s (data ``simulate_data(PRNGKey(s))``) and replicate r
(SMC key ``PRNGKey(1000 + s + 100 r)``; r = 0 is the key of ``smc_accuracy.py``) both
schedules are run with the same key, and scored with the references of
``smc_accuracy.py`` (imported: closed form, quadrature, long NUTS; cached in
``benchmarks/results/smc_reference_cache.json``):

- accuracy: worst parameter's |mean error| in reference-sd units and |sd ratio − 1|
  (worst and average over runs), and the root mean square of every parameter's errors
  over all runs (less noisy than the worst: √N times it is about the square root of the
  inefficiency);
- cost: stages, forward evaluations, sequential rounds (1 + total moves);
- degeneracy: the smallest per-stage ESS (fraction of N) after reweighting;
- linear_gaussian: log-evidence error against the closed form.

Usage::

    python benchmarks/smc_schedule_study.py [--particles 1000] [--seeds 0 1 2]
        [--replicates 3] [--models ...]

writes ``benchmarks/results/smc_schedule_study.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from smc_accuracy import RESULTS, evaluate_smc, nuts_reference, reference  # noqa: E402

from models import REFERENCE_MODELS  # noqa: E402

SCHEDULES = ("ess", "dmc")
# Configurations run: both schedules at run_smc's defaults, and (for the record of the
# defaults change) the ESS schedule at the previous defaults, ESS target 0.5 and
# decorrelation threshold 0.1.
# All with resample-move (waste_free=False), the variant this study was recorded with
# (before waste-free SMC became the default; see smc_waste_free_study.py for that).
CONFIGS = {
    "ess": {"schedule": "ess", "waste_free": False},
    "dmc": {"schedule": "dmc", "waste_free": False},
    "ess (0.5, corr 0.1)": {
        "schedule": "ess",
        "ess_target": 0.5,
        "corr_threshold": 0.1,
        "waste_free": False,
    },
}


def run(models, seeds, replicates, particles, log=print):
    out = {}
    for name in models:
        out[name] = {}
        for seed in seeds:
            nuts = nuts_reference(name, seed, log=log)
            ref, ref_name, extra = reference(name, seed, nuts)
            for rep, schedule in itertools.product(range(replicates), CONFIGS):
                key = jax.random.PRNGKey(1000 + seed + 100 * rep)
                kw = CONFIGS[schedule]
                r = evaluate_smc(name, seed, particles, ref, extra, key=key, **kw)
                r["mean_errors"] = list(r.pop("mean_by_param").values())
                r["sd_errors"] = list(r.pop("sd_by_param").values())
                r["reference"] = ref_name
                r["nuts_gradient_evaluations"] = nuts["gradient_evaluations"]
                if "mirror_mass" in extra:
                    r["mirror_mass_quadrature"] = extra["mirror_mass"]
                out[name].setdefault(schedule, {})[f"{seed}/{rep}"] = r
                log(
                    f"{name} seed {seed}/{rep} {schedule}: mean err {r['mean']:.3f}, sd err "
                    f"{r['sd']:.3f}, {r['stages']} stages, {r['forward_evaluations']} evals, "
                    f"{r['rounds']} rounds, min ESS {r['min_ess']:.3f}, {r['seconds']:.0f} s"
                )
    return out


def summary(runs):
    """Worst / mean over seeds of one (model, schedule)."""

    def col(k):
        return np.array([r[k] for r in runs.values()], dtype=float)

    mean_errors = np.concatenate([r["mean_errors"] for r in runs.values()])
    sd_errors = np.concatenate([r["sd_errors"] for r in runs.values()])
    s = {
        "runs": len(runs),
        "mean_err_rms": np.sqrt(np.mean(mean_errors**2)),
        "sd_err_rms": np.sqrt(np.mean(sd_errors**2)),
        "mean_err_worst": col("mean").max(),
        "mean_err_avg": col("mean").mean(),
        "sd_err_worst": col("sd").max(),
        "sd_err_avg": col("sd").mean(),
        "stages_avg": col("stages").mean(),
        "evaluations_avg": col("forward_evaluations").mean(),
        "rounds_avg": col("rounds").mean(),
        "min_ess": col("min_ess").min(),
        "seconds_avg": col("seconds").mean(),
    }
    if all("log_evidence_error" in r for r in runs.values()):
        e = col("log_evidence_error")
        s["log_evidence_error_worst"] = float(np.abs(e).max())
        s["log_evidence_error_rms"] = float(np.sqrt(np.mean(e**2)))
    if all("mirror_mass" in r for r in runs.values()):
        s["mirror_mass"] = col("mirror_mass").tolist()
        s["mirror_mass_quadrature"] = col("mirror_mass_quadrature").tolist()
    return {k: (float(v) if not isinstance(v, list) else v) for k, v in s.items()}


def markdown(results, summaries, meta, verdict):
    lines = [
        "# SMC tempering schedule: ESS bisection vs data-misfit controller",
        "",
        f"Generated by `benchmarks/smc_schedule_study.py`: models {meta['models']}, seeds "
        f"{meta['seeds']} × {meta['replicates']} replicates (data seed s, SMC key "
        "PRNGKey(1000 + s + 100 r), the same key for every configuration), "
        f"{meta['particles']} particles × 1 chain, resample-move (`waste_free=False`, "
        "the variant this study was recorded with) and every other option at "
        f"`run_smc`'s defaults ({meta['smc_defaults']}). Configurations: `ess` and `dmc` "
        "(the two schedules), and `ess (0.5, corr 0.1)`: the ESS schedule at the previous "
        "defaults (ESS target 0.5, decorrelation threshold 0.1), the record behind the "
        f"change of defaults. {meta['platform']}; total {meta['seconds']:.0f} s wall (nice 19 "
        "on a shared 2-core machine). References as in `smc_accuracy.md` (closed form, "
        "quadrature, long NUTS runs).",
        "",
        "Errors: worst parameter, |mean − reference| / reference sd and |sd / reference sd "
        "− 1|, worst (avg) over runs; rms: over every parameter of every run. Evaluations, "
        "rounds and stages: average over runs. Min ESS: the smallest post-reweighting ESS "
        "(fraction of N) of any stage and run.",
        "",
        "| model | schedule | mean err worst (avg) | sd err worst (avg) | mean / sd err rms "
        "| stages | forward evals | rounds | min ESS | log Z err worst (rms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results:
        for schedule in CONFIGS:
            s = summaries[name][schedule]
            lz = (
                f"{s['log_evidence_error_worst']:.3f} ({s['log_evidence_error_rms']:.3f})"
                if "log_evidence_error_worst" in s
                else "–"
            )
            lines.append(
                f"| {name} | {schedule} | {s['mean_err_worst']:.3f} ({s['mean_err_avg']:.3f}) "
                f"| {s['sd_err_worst']:.3f} ({s['sd_err_avg']:.3f}) "
                f"| {s['mean_err_rms']:.3f} / {s['sd_err_rms']:.3f} | {s['stages_avg']:.1f} "
                f"| {s['evaluations_avg']:,.0f} | {s['rounds_avg']:.1f} | {s['min_ess']:.3f} "
                f"| {lz} |"
            )
    if "exp_sine" in summaries:
        lines += ["", "exp_sine mirror-mode mass (amplitude < 0) per run (seed/replicate):", ""]
        q = summaries["exp_sine"]["ess"]["mirror_mass_quadrature"]
        lines.append(f"- runs: {', '.join(results['exp_sine']['ess'])}")
        lines.append(f"- quadrature: {', '.join(f'{100 * x:.2f} %' for x in q)}")
        for schedule in CONFIGS:
            m = summaries["exp_sine"][schedule]["mirror_mass"]
            lines.append(f"- {schedule}: {', '.join(f'{100 * x:.2f} %' for x in m)}")
        lines += ["", "exp_sine main mode (amplitude > 0) against its quadrature, worst run:", ""]
        for schedule in CONFIGS:
            runs = results["exp_sine"][schedule].values()
            m = max(r["main_mode"]["mean"] for r in runs)
            sd = max(r["main_mode"]["sd"] for r in runs)
            lines.append(f"- {schedule}: mean err {m:.3f}, sd err {sd:.3f}")
    lines += ["", "Per-stage Δt (first run):", ""]
    for name in results:
        for schedule in SCHEDULES:
            r = next(iter(results[name][schedule].values()))
            dts = ", ".join(f"{x:.3g}" for x in r["dt"])
            ess = ", ".join(f"{x:.2f}" for x in r["ess"])
            lines.append(f"- {name} {schedule}: Δt [{dts}]; ESS [{ess}]; moves {r['moves']}")
    lines += ["", "## Verdict", "", verdict]
    return "\n".join(lines) + "\n"


def verdict_text(summaries, default):
    """A measured comparison, worded from the numbers (no prior opinion)."""
    lines = []
    acc = {s: 0.0 for s in SCHEDULES}
    acc_wo = {s: 0.0 for s in SCHEDULES}
    cost = {s: 0.0 for s in SCHEDULES}
    for name, by in summaries.items():
        e, d = by["ess"], by["dmc"]
        for s in SCHEDULES:
            worst = max(by[s]["mean_err_worst"], by[s]["sd_err_worst"])
            acc[s] = max(acc[s], worst)
            if name != "exp_sine":
                acc_wo[s] = max(acc_wo[s], worst)
            cost[s] += by[s]["evaluations_avg"]
        ratio = d["evaluations_avg"] / e["evaluations_avg"]
        lines.append(
            f"- {name}: DMC/ESS forward evaluations {ratio:.2f}, "
            f"stages {d['stages_avg']:.1f} vs {e['stages_avg']:.1f}; rms mean err DMC "
            f"{d['mean_err_rms']:.3f} vs ESS {e['mean_err_rms']:.3f}, rms sd err "
            f"{d['sd_err_rms']:.3f} vs {e['sd_err_rms']:.3f}; smallest stage ESS DMC "
            f"{d['min_ess']:.3f} vs ESS {e['min_ess']:.3f}."
        )
    min_ess = {s: min(by[s]["min_ess"] for by in summaries.values()) for s in SCHEDULES}
    old = "ess (0.5, corr 0.1)"
    if all(old in by for by in summaries.values()):
        lines += ["", "Previous defaults (ESS target 0.5, threshold 0.1) against the current:"]
        for name, by in summaries.items():
            e, o = by["ess"], by[old]
            lines.append(
                f"- {name}: forward evaluations {o['evaluations_avg']:,.0f} vs "
                f"{e['evaluations_avg']:,.0f}; rms mean / sd err {o['mean_err_rms']:.3f} / "
                f"{o['sd_err_rms']:.3f} vs {e['mean_err_rms']:.3f} / {e['sd_err_rms']:.3f}; "
                f"worst {max(o['mean_err_worst'], o['sd_err_worst']):.3f} vs "
                f"{max(e['mean_err_worst'], e['sd_err_worst']):.3f}"
                + (
                    f"; log Z rms err {o['log_evidence_error_rms']:.3f} vs "
                    f"{e['log_evidence_error_rms']:.3f}"
                    if "log_evidence_error_rms" in e
                    else ""
                )
                + "."
            )
    lines += [
        "",
        f"Over all models: worst error of any run and parameter (mean or sd) ESS "
        f"{acc['ess']:.3f}, DMC {acc['dmc']:.3f} (without exp_sine: ESS {acc_wo['ess']:.3f}, "
        f"DMC {acc_wo['dmc']:.3f}); sum of the models' average forward evaluations ESS "
        f"{cost['ess']:,.0f}, DMC {cost['dmc']:,.0f}; smallest stage ESS: ESS "
        f"{min_ess['ess']:.3f}, DMC {min_ess['dmc']:.3f}. `run_smc`'s default schedule: "
        f"`{default}`.",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replicates", type=int, default=3, help="SMC keys per seed")
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    parser.add_argument("--out", default=str(RESULTS / "smc_schedule_study"))
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(opts.models, opts.seeds, opts.replicates, opts.particles)
    summaries = {name: {s: summary(by[s]) for s in CONFIGS} for name, by in results.items()}
    import inspect

    from eki_infer.smc import run_smc

    sig = inspect.signature(run_smc).parameters
    meta = {
        "models": opts.models,
        "seeds": opts.seeds,
        "replicates": opts.replicates,
        "particles": opts.particles,
        "smc_defaults": ", ".join(
            f"{k} {sig[k].default}"
            for k in ("schedule", "ess_target", "min_moves", "max_moves", "corr_threshold")
        ),
        "platform": f"{platform.machine()} CPU, Python {platform.python_version()}, "
        f"jax {jax.__version__}, numpyro {numpyro.__version__}",
        "seconds": time.perf_counter() - start,
    }
    verdict = verdict_text(summaries, sig["schedule"].default)
    text = markdown(results, summaries, meta, verdict)
    Path(opts.out + ".md").write_text(text)
    Path(opts.out + ".json").write_text(
        json.dumps(
            {"meta": meta, "summary": summaries, "runs": results, "verdict": verdict},
            indent=2,
            default=float,
        )
    )
    print(text)


if __name__ == "__main__":
    main()

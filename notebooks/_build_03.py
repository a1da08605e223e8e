"""Writes notebooks/03_schedulers.ipynb (outputs are not stored).

Run ``python notebooks/_build_03.py`` after editing the cells here. The notebook runs
the scheduler study of ``benchmarks/scheduler_study.py`` (small when EKI_INFER_SMALL=1,
as in the test suite) and writes nothing into the repository.
"""

from _build import write
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_code_cell(
        """import os
SMALL = os.environ.get("EKI_INFER_SMALL") == "1"   # the test suite runs a reduced size"""
    ),
    new_markdown_cell(
        "# Which time-stepping scheduler? The EKP scheduler study, reproduced\n\n"
        "EnsembleKalmanProcesses.jl's documentation compares five ways of choosing the step "
        "Δt on one nonlinear problem and draws conclusions that eki_infer's defaults rest on "
        "(the data-misfit controller to T = 1 for posteriors, the stable scheduler for EKS). "
        "This notebook reruns that study with eki_infer and extends it with what a user "
        "wants to know: how good is the *posterior* each scheduler ends with?\n\n"
        "**Problem** (`models/exp_sine.py`): f(t) = exp(A sin t + v) on t ∈ [0, 2π]; only "
        "max f and mean f are observed, with noise Γ = 0.1 I; priors A ~ N(2, 1), "
        "v ~ N(0, 5²); truth θ* = (1.0, 0.8).\n\n"
        "**Schedulers**: `DefaultScheduler(0.5)` (fixed long step), `DefaultScheduler(0.02)` "
        "(fixed short step: 50 steps end at T = 1), `EKSStableScheduler()`, "
        "`DataMisfitController()` (stops at T = 1), "
        '`DataMisfitController(on_terminate="continue")`; at most 50 iterations each.\n\n'
        "**Measured per iteration** in θ = (amplitude, vertical_shift): error = mean over "
        "members of ‖θ_i − θ*‖², spread = mean over members of ‖θ_i − θ̄‖².\n\n"
        "The full study (100 initial ensembles) is one command: "
        "`python benchmarks/scheduler_study.py`; its report is "
        "`benchmarks/results/scheduler_study/results.md`."
    ),
    new_code_cell(
        '''import sys
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display


def find_repository():
    """The repository root: on PYTHONPATH (as in the tests), the working folder or above."""
    candidates = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    candidates += [Path.cwd(), Path.cwd().parent]
    for p in candidates:
        if (Path(p) / "benchmarks" / "scheduler_study.py").exists():
            return Path(p).resolve()
    raise RuntimeError("Run this notebook inside the eki_infer repository.")


ROOT = find_repository()
sys.path.insert(0, str(ROOT / "benchmarks"))
import scheduler_study as study  # noqa: E402

study.use_compile_cache()   # JAX's compilation cache, in the temporary folder'''
    ),
    new_markdown_cell(
        "## 1. Run the study\n\n"
        "EKI and EKS use J = 50 members; every scheduler starts from the same initial "
        "ensembles, run side by side as independent chains of one `EKIInference` run "
        "(`num_chains`). UKI is deterministic (one run) and comes in two modes:\n\n"
        "- `uki_iterative`: the study's UKI, iterative with prediction inflation "
        "(Σ_ν = 2Γ/Δt, predicted covariance C + Δt·Σ_ω with Σ_ω the prior covariance, as in "
        "EnsembleKalmanProcesses.jl);\n"
        "- `uki_tempering`: eki_infer's default UKI, no inflation (the posterior at T = 1).\n\n"
        "EKS (with ALDI) runs under the same schedulers to see where it blows up; a blow-up "
        "is caught and reported. At small size (the test suite) there are 4 ensembles, a "
        "subset of the UKI/EKS runs, and no NUTS."
    ),
    new_code_cell(
        """results = study.run_study(small=SMALL, nuts=not SMALL)
print(f"study: {results['seconds']:.0f} s")"""
    ),
    new_markdown_cell(
        "## 2. Iterations to termination, final error and spread\n\n"
        "The data-misfit controller (DMC) stops by itself when its steps reach T = 1; "
        "every other configuration runs its 50 iterations."
    ),
    new_code_cell(
        """rows = study.iterations_table(results)
lines = ["| configuration | status | iterations median (range) | final T |", "|---|---|---|---|"]
for r in rows:
    if "iterations_median" in r:
        lines.append(f"| {r['config']} | {r['status']} | {r['iterations_median']:g} "
                     f"({r['iterations_min']:g}-{r['iterations_max']:g}) | {r['T_median']:.3g} |")
    else:
        lines.append(f"| {r['config']} | {r['status']} | - | - |")
display(Markdown("\\n".join(lines)))

lines = ["| configuration | error (mean) | spread (mean) |", "|---|---|---|"]
for r in study.final_table(results):
    lines.append(f"| {r['config']} | {r['error_mean']:.3g} | {r['spread_mean']:.3g} |")
display(Markdown("\\n".join(lines)))"""
    ),
    new_markdown_cell(
        "## 3. Solutions, error and spread\n\n"
        "Top: EKI (ensemble 0), bottom: UKI (iterative). Left: the curve at each "
        "scheduler's final mean against the truth (black); right: the observed max and "
        "mean (black), their noise band (grey) and each scheduler's G(θ̄) (dotted)."
    ),
    new_code_cell("study.figure_solutions(results);"),
    new_markdown_cell(
        "Error (solid) and spread (dashed) against iteration: one run, the mean over "
        "ensembles, and the final values."
    ),
    new_code_cell(
        """study.figure_error_spread(results, ("eki",))
study.figure_error_spread(results, ("uki_iterative", "uki_tempering"));"""
    ),
    new_code_cell(
        """study.figure_final_error_vs_spread(results)
study.figure_eks_blowup(results);"""
    ),
    new_markdown_cell(
        "## 4. The study's claims, checked\n\n"
        "Each verdict is computed from the numbers above (the criteria are in "
        "`scheduler_study.claims`). At small size a claim may be undecided or differ from "
        "the full study; the full study's verdicts follow below when its results exist."
    ),
    new_code_cell(
        """for c in study.claims(results):
    print(f"[{c['verdict'].upper()}] {c['claim']}\\n    {c['evidence']}\\n")"""
    ),
    new_markdown_cell(
        "## 5. Posterior accuracy at termination\n\n"
        "Against the quadrature posterior (`exact_posterior`, whole posterior including the "
        "~1% mirror mode at A < 0): |θ̄ − μ|/σ and sd/σ per parameter, averaged over "
        "ensembles. Only the configurations that target the posterior — EKI and tempering "
        "UKI at T = 1 (`dmc`, `fixed_short`) and EKS — should be read as posteriors; the "
        "others are optimisers and collapse (or, for iterative UKI, inflate) by design."
    ),
    new_code_cell(
        """lines = ["| configuration | mean error / sd (A, v) | sd ratio (A, v) | "
         "sd ratio vs main mode (A) |", "|---|---|---|---|"]
for r in study.posterior_table(results):
    z, s, m = r["mean_error_sd"], r["sd_ratio"], r["sd_ratio_main"]
    lines.append(f"| {r['config']} | {z[0]:.2f}, {z[1]:.2f} | {s[0]:.2f}, {s[1]:.2f} "
                 f"| {m[0]:.2f} |")
display(Markdown("\\n".join(lines)))"""
    ),
    new_markdown_cell("## 6. The full study's verdicts (100 ensembles), if it has been run"),
    new_code_cell(
        """import json

full = ROOT / "benchmarks" / "results" / "scheduler_study" / "results.json"
if full.exists():
    report = json.loads(full.read_text())
    print(f"full study: {report['setting']['num_ensembles']} ensembles, {report['seconds']:.0f} s")
    for c in report["claims"]:
        print(f"[{c['verdict'].upper()}] {c['claim']}\\n    {c['evidence']}\\n")
else:
    print("run `python benchmarks/scheduler_study.py` for the full study")
plt.close("all")"""
    ),
]


if __name__ == "__main__":
    write("03_schedulers.ipynb", CELLS)

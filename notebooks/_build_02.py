"""Writes notebooks/02_compare_with_nuts.ipynb from the cell list below (outputs are not
stored). Run ``python notebooks/_build_02.py`` after editing; the tests execute the
.ipynb itself (tests/test_notebooks.py, with EKI_INFER_SMALL=1)."""

from _build import write
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell(
        "# Ensemble Kalman posteriors side by side with NUTS\n\n"
        "`eki_infer.compare` runs NUTS on the very same NumPyro model and measures, per "
        "parameter, how far an approximation is from it (mean error in posterior-sd units, "
        "sd ratio, 1-Wasserstein distance of the marginals), a joint measure (energy "
        "distance) and the cost (forward evaluations against NUTS's gradient evaluations). "
        "Three reference models from `models/`: one where ensemble Kalman methods are exact, "
        "one where they are good, one where they are not."
    ),
    new_code_cell(
        """import os
SMALL = os.environ.get("EKI_INFER_SMALL") == "1"   # the test suite runs a reduced size

import jax
import numpy as np
import numpyro
import matplotlib.pyplot as plt

numpyro.enable_x64()
from eki_infer import EKIInference
from eki_infer.compare import compare, MethodRun
from eki_infer.demo import load_reference_model   # models/ lives in the source checkout

J = 100 if SMALL else 1000            # EKI ensemble size on the linear model
NUTS_KW = dict(num_warmup=200, num_samples=200) if SMALL else {}   # default: 1000 + 1000"""
    ),
    new_markdown_cell(
        "## 1. Linear-Gaussian: the exact case\n\n"
        "y = Xθ + ε with a Gaussian prior: every ensemble Kalman update is an exact "
        "Gaussian conditioning, so EKI's only error is Monte-Carlo error (~1/√J posterior "
        "sd) and UKI's Gaussian is the posterior itself. The closed form lets us check NUTS "
        "too."
    ),
    new_code_cell(
        """lg = load_reference_model("linear_gaussian")
args, y = lg.simulate_data(jax.random.PRNGKey(0))

eki = EKIInference(lg.model, method="eki", ensemble_size=J, progress_bar=False)
eki.run(jax.random.PRNGKey(1), *args, y=y)
uki = EKIInference(lg.model, method="uki", num_samples=J, progress_bar=False)
uki.run(jax.random.PRNGKey(2), *args, y=y)

comp = compare(lg.model, *args, y=y, results=[eki, uki], rng_key=jax.random.PRNGKey(3), **NUTS_KW)
comp"""
    ),
    new_markdown_cell(
        "The same draws against the closed-form posterior (exact draws as the reference). "
        "NUTS is now one of the compared methods: its errors are its own Monte-Carlo error."
    ),
    new_code_cell(
        """mean, cov = lg.exact_posterior(*args, y)
exact = {"theta": np.random.default_rng(0).multivariate_normal(mean, cov, 20000)}
vs_exact = compare(results={"EKI": eki, "UKI": uki, "NUTS": {"theta": comp.draws["NUTS"]}},
                   reference=exact, reference_name="exact")
print(vs_exact.to_markdown(per_parameter=False))"""
    ),
    new_code_cell("""comp.plot(max_parameters=3);"""),
    new_markdown_cell(
        "## 2. SIR epidemic: nonlinear, positive parameters\n\n"
        "An ODE forward map and log-normal, gamma and beta priors. The posterior is narrow "
        "and close to Gaussian in the whitened coordinates EKI works in, so EKI and UKI land "
        "close to NUTS at a few percent of its model evaluations. NUTS starts at the prior "
        "median (`compare`'s default) to stay out of a burnt-out-epidemic local optimum."
    ),
    new_code_cell(
        """sir = load_reference_model("sir")
args, y = sir.simulate_data(jax.random.PRNGKey(0))
engines = {}
for method in ("eki",) if SMALL else ("eki", "uki"):   # UKI too at full size
    engine = EKIInference(sir.model, method=method, ensemble_size=100 if SMALL else 200,
                          num_samples=1000, progress_bar=False)
    engine.run(jax.random.PRNGKey(4), *args, y=y)
    engines[method.upper()] = engine
sir_comp = compare(sir.model, *args, y=y, results=engines, rng_key=jax.random.PRNGKey(5), **NUTS_KW)
sir_comp"""
    ),
    new_code_cell("""sir_comp.plot();"""),
    new_markdown_cell(
        "## 3. Eight schools: where ensemble Kalman methods are poor\n\n"
        "tau ~ HalfCauchy(5) and theta ~ N(mu, tau): the posterior is a funnel with a heavy "
        "right tail in tau. An ensemble Kalman update is a Gaussian (linear) regression of "
        "the parameters on the data; it cannot represent the funnel, and the tau marginal "
        "comes out far too wide. The reference is NUTS on the non-centred model (same "
        "posterior; NUTS on the centred form diverges)."
    ),
    new_code_cell(
        """es = load_reference_model("eight_schools")
args, y = es.simulate_data(None)
eki8 = EKIInference(es.model, method="eki", ensemble_size=100 if SMALL else 400, progress_bar=False)
eki8.run(jax.random.PRNGKey(6), *args, y=y)
from eki_infer.nuts import run_nuts
nuts8 = run_nuts(es.model_noncentered, jax.random.PRNGKey(7), *args, y=y, **NUTS_KW)
es_comp = compare(results={"EKI": eki8}, reference=nuts8, sites=["mu", "tau"])
print(es_comp.to_markdown())
for name, draws in es_comp.draws.items():
    q = np.quantile(draws[:, 1], [0.05, 0.5, 0.95])
    print(f"{name:5s} tau 5/50/95 %: {q.round(2)}")"""
    ),
    new_code_cell("""es_comp.plot();"""),
    new_markdown_cell(
        "## 4. What it costs\n\n"
        "Forward evaluations of the ensemble methods against NUTS's gradient evaluations "
        "(leapfrog steps, warmup included). A gradient evaluation costs a forward run plus "
        "its reverse pass, so the ratio of evaluations understates the savings in compute; "
        "the seconds here include JAX compilation and are not a fair timing on small models."
    ),
    new_code_cell(
        """rows = []
for label, c in [("linear", comp), ("SIR", sir_comp), ("8 schools", es_comp)]:
    for name, cost in c.cost.items():
        rows.append((label, name, cost["evaluations"], cost["kind"]))
for r in rows:
    print(f"{r[0]:10s} {r[1]:5s} {r[2]:>8,} {r[3]}")
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.barh([f"{r[0]} {r[1]}" for r in rows], [r[2] for r in rows],
        color=["k" if r[3] == "gradient" else "C0" for r in rows])
ax.set_xscale("log"); ax.set_xlabel("model evaluations (black: NUTS gradients)")
fig.tight_layout()"""
    ),
    new_markdown_cell(
        "The full study — six reference models, EKI/EKS/UKI, NumPyro's AIES and ESS at "
        "matched cost, several seeds — is `benchmarks/posterior_accuracy.py`; its table is "
        "in `benchmarks/results/posterior_accuracy.md`."
    ),
]


if __name__ == "__main__":
    write("02_compare_with_nuts.ipynb", CELLS)

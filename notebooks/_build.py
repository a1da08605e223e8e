"""Writes the notebooks from the cell lists below (outputs are not stored).

Run ``python notebooks/_build.py`` after editing a notebook's cells here; the tests
execute the .ipynb files themselves.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SMALL = """import os
SMALL = os.environ.get("EKI_INFER_SMALL") == "1"   # the test suite runs a reduced size
"""

QUICKSTART = [
    new_markdown_cell(
        "# eki_infer in ten minutes\n\n"
        "A NumPyro model with a nonlinear forward map and a Gaussian likelihood with known "
        "noise, calibrated without a single gradient: ensemble Kalman inversion (EKI) from "
        "the prior to the posterior, then the same model under UKI and NUTS for comparison."
    ),
    new_code_cell(
        SMALL
        + """import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import arviz as az
import matplotlib.pyplot as plt

numpyro.enable_x64()
from eki_infer import EKIInference"""
    ),
    new_markdown_cell(
        "## 1. The model: ordinary NumPyro code\n\n"
        "The exponential-sine problem of the EnsembleKalmanProcesses.jl scheduler study: "
        "f(t) = exp(A sin t + v), and only the maximum and the mean of f are observed, with "
        "Γ = 0.1 I. Nothing about ensembles appears in the model."
    ),
    new_code_cell(
        """def model(t, y=None):
    amplitude = numpyro.sample("amplitude", dist.Normal(2.0, 1.0))
    vertical_shift = numpyro.sample("vertical_shift", dist.Normal(0.0, 5.0))
    f = jnp.exp(amplitude * jnp.sin(t) + vertical_shift)
    numpyro.sample("y", dist.MultivariateNormal(jnp.stack([f.max(), f.mean()]),
                                               0.1 * jnp.eye(2)), obs=y)

t = jnp.arange(630) * 0.01
truth = {"amplitude": 1.0, "vertical_shift": 0.8}
f_true = jnp.exp(truth["amplitude"] * jnp.sin(t) + truth["vertical_shift"])
y_obs = jnp.stack([f_true.max(), f_true.mean()]) + jnp.sqrt(0.1) * jax.random.normal(
    jax.random.PRNGKey(1), (2,))
y_obs"""
    ),
    new_markdown_cell(
        "## 2. Run EKI\n\n"
        "`run` returns an ArviZ object (`InferenceData` on arviz 0.x, `DataTree` on 1.x). "
        "Chains are independent ensembles; the data-misfit controller picks the steps so "
        "that they sum to exactly T = 1."
    ),
    new_code_cell(
        """J = 50 if SMALL else 400
engine = EKIInference(model, method="eki", ensemble_size=J, num_chains=2, progress_bar=False)
idata = engine.run(jax.random.PRNGKey(0), t, y=y_obs)
engine.print_summary()"""
    ),
    new_code_cell("""az.summary(idata, var_names=["amplitude", "vertical_shift"])"""),
    new_markdown_cell(
        "## 3. The tempering path\n\n"
        "`engine.history` holds, per chain and iteration, the time t, the step Δt, the mean "
        "data misfit, failures and the cumulative number of forward evaluations."
    ),
    new_code_cell(
        """h = engine.history
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(h.t.T, marker="o")
axes[0].set(xlabel="iteration", ylabel="t")
axes[1].semilogy(h.misfit_mean.T)
axes[1].set(xlabel="iteration", ylabel="mean misfit")
fig.tight_layout()
print("iterations:", h.t.shape[1])
print("forward evaluations per chain:", h.forward_evaluations[:, -1])"""
    ),
    new_markdown_cell(
        "## 4. Same model, other methods\n\n"
        "UKI uses 2d + 1 sigma points per iteration; NUTS needs gradients. The table "
        "compares posterior means and sds and the cost. NUTS starts at the prior median "
        "(`init_to_median`): both observables are even in the amplitude, so the posterior "
        "has a mirror mode at A < 0 (about 2 % of its mass), and a chain started at "
        "NumPyro's default random point can settle there and report the opposite sign."
    ),
    new_code_cell(
        """from numpyro.infer import init_to_median
from eki_infer.nuts import run_nuts

uki = EKIInference(model, method="uki", num_samples=J, progress_bar=False)
uki.run(jax.random.PRNGKey(0), t, y=y_obs)
nuts = run_nuts(model, jax.random.PRNGKey(0), t, y=y_obs, init_strategy=init_to_median,
                num_warmup=200 if SMALL else 1000, num_samples=200 if SMALL else 1000)

rows = {"EKI": engine.get_samples(), "UKI": uki.get_samples(), "NUTS": nuts.samples}
for name, s in rows.items():
    a, v = np.ravel(s["amplitude"]), np.ravel(s["vertical_shift"])
    print(f"{name:5s} amplitude {a.mean():6.3f} ± {a.std():.3f}",
          f"  vertical_shift {v.mean():6.3f} ± {v.std():.3f}")
print("forward evaluations EKI:", int(engine.history.forward_evaluations[:, -1].sum()),
      " UKI:", int(uki.history.forward_evaluations[:, -1].sum()),
      " NUTS gradient evaluations:", nuts.gradient_evaluations)"""
    ),
    new_markdown_cell("## 5. Posterior predictive check"),
    new_code_cell(
        """from eki_infer.convert import group  # a group as a Dataset, on arviz 0.x and 1.x

ppc = group(idata, "posterior_predictive")["y"].values   # (chain, draw, 2)
print("observed:", np.asarray(y_obs), " predictive mean:", ppc.mean(axis=(0, 1)))"""
    ),
    new_markdown_cell(
        "`idata` also holds a `log_likelihood` group, so `az.loo` and `az.compare` run on "
        "it. They are not shown here: this model has one observation (the two summaries "
        "form a single MultivariateNormal event), and leave-one-out over one observation "
        "is the whole likelihood. A model with a plate of observations, such as eight "
        "schools in `02_compare_with_nuts.ipynb`, gets one pointwise value per plate element."
    ),
]


def write(name, cells):
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)

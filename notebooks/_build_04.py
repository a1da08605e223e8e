"""Writes notebooks/04_black_box_simulators.ipynb (run: python notebooks/_build_04.py)."""

from _build import write
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell(
        "# Black-box simulators, Dask and checkpoints\n\n"
        "The forward model here is plain NumPy — a stand-in for a Fortran or C++ code, "
        "or anything that is not JAX. `black_box` lets the NumPyro model call it; "
        "`EKIInference` hands the whole ensemble to an *executor* (here a Dask "
        "`LocalCluster`), survives members that crash, and can checkpoint every iteration."
    ),
    new_code_cell(
        """import os
SMALL = os.environ.get("EKI_INFER_SMALL") == "1"   # the test suite runs a reduced size
import tempfile, time
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

numpyro.enable_x64()
from eki_infer import EKIInference
from eki_infer.executors import DaskExecutor
from eki_infer.simulators import black_box"""
    ),
    new_markdown_cell(
        "## 1. A slow simulator that sometimes fails\n\n"
        "An SIR epidemic integrated with explicit Euler steps in NumPy, 20 ms per run, "
        "which raises for a small region of parameter space (as real solvers do)."
    ),
    new_code_cell(
        """DAYS = np.arange(0, 60, 3.0)

def sir_simulator(beta, gamma):
    time.sleep(0.02)                                  # an expensive model
    if beta > 1.2:
        raise FloatingPointError("step size too large for this beta")
    s, i, dt, out = 0.99, 0.01, 0.1, []
    for step in range(int(DAYS[-1] / dt) + 1):
        if step % int(3.0 / dt) == 0:
            out.append(i)
        s, i = s - dt * beta * s * i, i + dt * (beta * s * i - gamma * i)
    return np.array(out)

simulate = black_box(sir_simulator, output_shape=DAYS.shape)

def model(y=None):
    beta = numpyro.sample("beta", dist.LogNormal(np.log(0.5), 0.5))
    gamma = numpyro.sample("gamma", dist.Gamma(8.0, 40.0))
    numpyro.sample("y", dist.Normal(simulate(beta, gamma), 0.01).to_event(1), obs=y)

y_obs = sir_simulator(0.45, 0.18) + 0.01 * np.random.default_rng(0).normal(size=DAYS.shape)"""
    ),
    new_markdown_cell(
        "## 2. The ensemble on a Dask cluster\n\n"
        "Two single-threaded workers on this machine; pass `DaskExecutor(client=...)` "
        "to use an existing cluster instead. Members are tasks."
    ),
    new_code_cell(
        """J = 16 if SMALL else 100
checkpoint = os.path.join(tempfile.mkdtemp(), "sir.ckpt")
with DaskExecutor(n_workers=2) as executor:
    engine = EKIInference(model, "eki", ensemble_size=J, executor=executor, progress_bar=False)
    start = time.perf_counter()
    idata = engine.run(jax.random.PRNGKey(0), y=y_obs, checkpoint=checkpoint)
    print(f"{time.perf_counter() - start:.1f} s,",
          int(engine.history.forward_evaluations[0, -1]), "simulator runs")
engine.print_summary()"""
    ),
    new_markdown_cell(
        "## 3. Failures are counted, not fatal\n\n"
        "Members whose simulator raised are redrawn from the successful ones; the counts "
        "are in the history and the final flags in `sample_stats`."
    ),
    new_code_cell(
        """print("failed members per iteration:", engine.history.num_failed[0])
from eki_infer.convert import group   # the same on arviz 0.x and 1.x
print("failed in the final ensemble:", int(group(idata, "sample_stats")["failed"].sum()))"""
    ),
    new_markdown_cell(
        "## 4. Resume from the checkpoint\n\n"
        "The checkpoint holds the complete state after every iteration (written "
        "atomically). Resuming with the same key reproduces the uninterrupted run exactly; "
        "here the run had finished, so resuming just rebuilds the result."
    ),
    new_code_cell(
        """again = EKIInference(model, "eki", ensemble_size=J, progress_bar=False)
again.resume(jax.random.PRNGKey(0), y=y_obs, checkpoint=checkpoint)
print(np.array_equal(again.get_samples()["beta"], engine.get_samples()["beta"]))"""
    ),
    new_markdown_cell(
        "## 5. Gradient-based inference refuses the model\n\n"
        "A black box has no derivatives; NUTS stops with a clear message instead of "
        "using a wrong gradient."
    ),
    new_code_cell(
        """from eki_infer.nuts import run_nuts
from eki_infer.simulators import BlackBoxGradientError
try:
    run_nuts(model, jax.random.PRNGKey(0), y=y_obs, num_warmup=5, num_samples=5)
except BlackBoxGradientError as error:
    print(error)"""
    ),
]


if __name__ == "__main__":
    write("04_black_box_simulators.ipynb", CELLS)

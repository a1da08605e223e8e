"""What float32 (JAX's default) costs: prior quantiles at large shapes, EKI at high
signal-to-noise, and how far the reference models are from the tracer's float32 warning.

    python benchmarks/float32_precision.py

Writes ``benchmarks/results/float32_precision.md`` and ``.json`` (about a minute on 2
cores). Each measurement that needs one precision, or the float32 inversion without the
large-shape expansions, runs in a fresh Python (``--part``), since JAX fixes the
precision at start-up and caches compiled quantiles.

1. Quantiles: the float32 site transform against the float64 one (itself pinned to the
   cdf by the tests), max over |u| <= 6 in prior sds, with the large-shape expansions
   (the default) and with the float32 inversion alone (the thresholds set to infinity).
2. Noise: transform EKI (J = 200, 2 chains) on a linear-Gaussian problem (d = 5, M = 20,
   outputs of order 1) against its exact posterior, noise sd 1e-6, 1e-4 and 1e-2, in
   each precision: the worst |mean error| in posterior sds and |sd ratio − 1|.
3. Roundings: each reference model's smallest noise sd in float32 roundings of its data
   or outputs (the tracer warns below 100).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRIORS = {
    "Gamma(1e4)": ("Gamma", (1e4, 1.0)),
    "Gamma(1e6)": ("Gamma", (1e6, 2.0)),
    "Beta(1e5, 1e5)": ("Beta", (1e5, 1e5)),
    "Beta(1e3, 1e5)": ("Beta", (1e3, 1e5)),
    "StudentT(1e6)": ("StudentT", (1e6, 0.0, 1.0)),
}
NOISES = (1e-6, 1e-4, 1e-2)


def _quantiles(inversion_only: bool) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import numpyro.distributions as dist

    from eki_infer.tracing import priors

    if inversion_only:
        for name in ("FLOAT32_GAMMA_MIN", "FLOAT32_BETA_MIN", "FLOAT32_STUDENTT_MIN"):
            setattr(priors, name, float("inf"))
    u = np.linspace(-6.0, 6.0, 241)
    out = {}
    for label, (family, params) in PRIORS.items():
        values = {}
        for dtype in (jnp.float32, jnp.float64):
            d = getattr(dist, family)(*(jnp.asarray(p, dtype) for p in params)).expand([len(u)])
            values[dtype] = np.asarray(priors.whitened_transform(d, jnp.asarray(u, dtype)), float)
        sd = float(np.sqrt(getattr(dist, family)(*params).variance))
        out[label] = float(np.max(np.abs(values[jnp.float32] - values[jnp.float64])) / sd)
    return out


def _noise(precision: str) -> dict:
    import jax

    jax.config.update("jax_enable_x64", precision == "float64")
    import warnings

    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from eki_infer import EKIInference

    rng = np.random.default_rng(0)
    d, m = 5, 20
    matrix = rng.standard_normal((m, d)) / np.sqrt(d)
    truth = rng.standard_normal(d)
    out = {}
    for noise in NOISES:
        y = 1.0 + matrix @ truth + noise * rng.standard_normal(m)

        def model(y=None, noise=noise):
            theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
            mean = 1.0 + jnp.asarray(matrix) @ theta
            numpyro.sample("y", dist.Normal(mean, noise).to_event(1), obs=y)

        precision_matrix = np.eye(d) + matrix.T @ matrix / noise**2
        cov = np.linalg.inv(precision_matrix)
        mean = cov @ (matrix.T @ (y - 1.0)) / noise**2
        sd = np.sqrt(np.diag(cov))
        engine = EKIInference(
            model, "eki", eki_variant="transform", ensemble_size=200, num_chains=2,
            progress_bar=False,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.run(jax.random.PRNGKey(1), y=jnp.asarray(y))
        draws = np.asarray(engine.get_samples()["theta"], float)
        out[f"{noise:g}"] = {
            "mean_error_sd": float(np.max(np.abs(draws.mean(0) - mean) / sd)),
            "sd_error": float(np.max(np.abs(draws.std(0) / sd - 1.0))),
            "float32_warning": any("roundings" in str(w.message) for w in caught),
        }
    return out


def _roundings() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eki_infer.tracing import trace_model
    from models import REFERENCE_MODELS

    eps = float(jnp.finfo(jnp.float32).eps)
    out = {}
    for name, module in REFERENCE_MODELS.items():
        args, y = module.simulate_data(jax.random.PRNGKey(0))
        problem = trace_model(module.model, *args, y=y)
        outputs = np.abs(problem.probe_signature.outputs)
        size = np.maximum(
            np.abs(np.asarray(problem.observations)),
            np.where(np.isfinite(outputs), outputs, 0.0).max(0),
        )
        sd = np.sqrt(np.asarray(problem.noise.variances(), float))
        out[name] = float(np.min(sd / (eps * size)))
    return out


def _in_fresh_python(part: str, precision: str = "float32") -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "--part", part, "--precision", precision],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {
        "quantiles_with_expansions": _in_fresh_python("quantiles"),
        "quantiles_inversion_only": _in_fresh_python("inversion"),
        "noise": {p: _in_fresh_python("noise", p) for p in ("float32", "float64")},
        "roundings": _in_fresh_python("roundings"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "float32_precision.json").write_text(json.dumps(results, indent=2) + "\n")
    q, qi = results["quantiles_with_expansions"], results["quantiles_inversion_only"]
    lines = [
        "# float32 precision (`python benchmarks/float32_precision.py`)",
        "",
        "## Prior quantiles: float32 vs float64 site transform, max over |u| <= 6, prior sds",
        "",
        "| prior | float32 inversion alone | with the large-shape expansions (default) |",
        "| --- | --- | --- |",
        *(f"| {k} | {qi[k]:.2g} | {q[k]:.2g} |" for k in q),
        "",
        "## Transform EKI (J = 200 × 2 chains) against the exact posterior, d = 5, M = 20",
        "",
        "| noise sd | float32: mean err (sd) / sd err | float32 warns | float64 |",
        "| --- | --- | --- | --- |",
    ]
    for noise in results["noise"]["float32"]:
        a, b = results["noise"]["float32"][noise], results["noise"]["float64"][noise]
        lines.append(
            f"| {noise} | {a['mean_error_sd']:.3f} / {a['sd_error']:.1%} | "
            f"{'yes' if a['float32_warning'] else 'no'} | "
            f"{b['mean_error_sd']:.3f} / {b['sd_error']:.1%} |"
        )
    lines += [
        "",
        "## Reference models: smallest noise sd in float32 roundings (warning below 100)",
        "",
        "| model | roundings |",
        "| --- | --- |",
        *(f"| {k} | {v:.3g} |" for k, v in results["roundings"].items()),
        "",
    ]
    (RESULTS / "float32_precision.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quantiles", "inversion", "noise", "roundings"))
    parser.add_argument("--precision", default="float32", choices=("float32", "float64"))
    options = parser.parse_args()
    if options.part is None:
        main()
    else:
        part = {
            "quantiles": lambda: _quantiles(False),
            "inversion": lambda: _quantiles(True),
            "noise": lambda: _noise(options.precision),
            "roundings": _roundings,
        }[options.part]()
        print(json.dumps(part))

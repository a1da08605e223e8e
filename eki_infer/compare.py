"""Side-by-side comparison of posterior approximations with a reference (NUTS by default).

:func:`compare` takes a model, its arguments and one or more results (an
:class:`~eki_infer.EKIInference` after ``run``, an ArviZ object, a NumPyro ``MCMC``, a
:class:`~eki_infer.nuts.NUTSResult`, a dict of draws or a :class:`MethodRun`), runs NUTS on
the same model unless a reference is given, and returns a :class:`Comparison`:

- per scalar parameter (vector sites are flattened: ``theta[0]``, ``theta[1]``, ...):
  the error of the mean in reference-sd units, the sd ratio and the 1-Wasserstein
  distance of the marginals (raw and in reference-sd units);
- per method, a joint measure: the energy distance between the draws after scaling
  every parameter by its reference sd;
- cost: forward-model evaluations (ensemble methods), gradient evaluations (NUTS:
  leapfrog steps, warmup included) or log-density evaluations (other samplers), and
  wall seconds.

The metrics are plain numpy (no scipy), exact for the empirical distributions they are
given:

- :func:`wasserstein_1d`: W1 = ∫ |F(t) − G(t)| dt of the two empirical CDFs, which for
  1-D distributions equals ∫₀¹ |F⁻¹(q) − G⁻¹(q)| dq;
- :func:`energy_distance`: D² = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (Székely & Rizzo),
  with U-statistics for the within-sample terms, so it is unbiased and is ≈ 0 (it may be
  slightly negative) for two samples of the same distribution; it is zero only for
  identical distributions and sees dependence as well as marginals.

:func:`plot_comparison` (matplotlib, imported on use) overlays the marginals and draws
pair plots.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eki_infer.user_warnings import warn

__all__ = [
    "Comparison",
    "MethodRun",
    "as_method_run",
    "compare",
    "energy_distance",
    "flatten_samples",
    "plot_comparison",
    "wasserstein_1d",
]

# --------------------------------------------------------------------------- metrics


def wasserstein_1d(x, y) -> float:
    """1-Wasserstein distance between the empirical distributions of samples ``x`` and ``y``.

    Exact for the two empirical (equal-weight) distributions, whatever their sizes:
    W1 = ∫ |F_x(t) − F_y(t)| dt, computed on the merged sorted sample (equal to the
    quantile form ∫₀¹ |F_x⁻¹(q) − F_y⁻¹(q)| dq in one dimension).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"wasserstein_1d compares two 1-D samples, got shapes {x.shape} and {y.shape} "
            "(compare one parameter at a time, or use energy_distance for the joint)."
        )
    if x.size == 0 or y.size == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("wasserstein_1d: the samples hold NaN or inf values.")
    x, y = np.sort(x), np.sort(y)
    merged = np.sort(np.concatenate([x, y]))
    widths = np.diff(merged)
    cdf_x = np.searchsorted(x, merged[:-1], side="right") / x.size
    cdf_y = np.searchsorted(y, merged[:-1], side="right") / y.size
    return float(np.sum(np.abs(cdf_x - cdf_y) * widths))


def _subsample(x: np.ndarray, max_points: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_points is None or x.shape[0] <= max_points:
        return x
    return x[rng.choice(x.shape[0], size=int(max_points), replace=False)]


def _mean_distance(a: np.ndarray, b: np.ndarray, same: bool) -> float:
    """Mean Euclidean distance between rows of ``a`` and ``b`` (off-diagonal mean if
    ``same``), in row blocks so memory stays ~16 MB whatever the sizes."""
    n, m, p = a.shape[0], b.shape[0], a.shape[1]
    rows = max(1, 2_000_000 // max(1, m * p))
    total = 0.0
    for start in range(0, n, rows):
        diff = a[start : start + rows, None, :] - b[None, :, :]
        total += float(np.sqrt(np.sum(diff * diff, axis=-1)).sum())
    if same:
        if n < 2:
            raise ValueError("energy_distance needs at least two points per sample.")
        return total / (n * (n - 1))
    return total / (n * m)


def energy_distance(x, y, scale=None, max_points: int | None = 2000, seed: int = 0) -> float:
    """Energy distance D² = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ between two samples.

    ``x``: (n,) or (n, p); ``y``: (m,) or (m, p). ``scale``: optional (p,) divisor applied
    to both samples first (:func:`compare` uses the reference posterior sd, so every
    parameter counts in its own posterior units). Samples larger than ``max_points`` are
    subsampled without replacement (cost is O(n m p)); ``None`` uses all points.
    Within-sample means are U-statistics (i ≠ j), so the estimate is unbiased and close
    to 0, possibly slightly negative, for two samples from one distribution.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance: incompatible shapes {x.shape} and {y.shape}.")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            f"energy_distance needs at least two points per sample, got shapes {x.shape} "
            f"and {y.shape}."
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("energy_distance: the samples hold NaN or inf values.")
    if max_points is not None and (isinstance(max_points, bool) or int(max_points) < 2):
        raise ValueError(f"max_points must be None or at least 2, got {max_points!r}.")
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape not in ((), (x.shape[1],)) or not np.all(np.isfinite(scale) & (scale > 0)):
            raise ValueError(
                f"energy_distance: scale must be positive and finite, of shape "
                f"({x.shape[1]},), got shape {scale.shape}."
            )
        x, y = x / scale, y / scale
    rng = np.random.default_rng(seed)
    x = _subsample(x, max_points, rng)
    y = _subsample(y, max_points, rng)
    return float(
        2.0 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)
    )


# --------------------------------------------------------------------------- inputs


def flatten_samples(samples: Mapping[str, Any], sites: Sequence[str] | None = None):
    """``(names, draws)``: site arrays of shape (draws, ...) as one (draws, P) float matrix.

    Scalar sites keep their name; the others are flattened in C order and named with
    their index, ``theta[0]`` or ``field[1,2]``. ``sites`` selects and orders the sites
    (default: all, in the mapping's order).
    """
    sites = list(samples) if sites is None else list(sites)
    names, columns = [], []
    num_draws = None
    for site in sites:
        values = np.asarray(samples[site], dtype=np.float64)
        if values.ndim == 0:
            raise ValueError(f"site {site!r}: expected draws along the first axis, got a scalar.")
        if num_draws is None:
            num_draws = values.shape[0]
        elif values.shape[0] != num_draws:
            raise ValueError(
                f"site {site!r} has {values.shape[0]} draws, earlier sites have {num_draws}."
            )
        event_shape = values.shape[1:]
        columns.append(values.reshape(values.shape[0], math.prod(values.shape[1:])))
        if event_shape == ():
            names.append(site)
        else:
            for index in np.ndindex(*event_shape):
                names.append(f"{site}[{','.join(str(i) for i in index)}]")
    if not columns:
        raise ValueError("no sites to flatten.")
    return names, np.concatenate(columns, axis=1)


@dataclasses.dataclass
class MethodRun:
    """Posterior draws of one method and what they cost.

    Attributes:
        samples: site → array (draws, ...) (chains already merged).
        evaluations: number of model evaluations spent (None if unknown).
        kind: what ``evaluations`` counts: ``"forward"`` (forward-model runs, ensemble
            methods), ``"gradient"`` (gradient evaluations of the log density, NUTS
            leapfrog steps) or ``"log_density"`` (log-density evaluations, e.g. AIES/ESS).
        seconds: wall time (None if unknown).
        note: free text carried into :meth:`Comparison.to_dict`.
    """

    samples: dict
    evaluations: int | None = None
    kind: str = "forward"
    seconds: float | None = None
    note: str = ""

    @classmethod
    def from_chains(cls, samples_by_chain: Mapping[str, Any], **kwargs) -> MethodRun:
        """From draws grouped by chain, site → (chains, draws, ...)."""
        merged = {}
        for k, v in samples_by_chain.items():
            v = np.asarray(v)
            merged[k] = v.reshape((-1, *v.shape[2:]))
        return cls(merged, **kwargs)


def _is_arviz(obj) -> bool:
    return type(obj).__name__ in ("InferenceData", "DataTree")


def _arviz_group(obj, name):
    from eki_infer.convert import group

    try:
        return group(obj, name)
    except (AttributeError, KeyError):
        return None


def _run_attrs(obj, posterior) -> dict:
    """The run's attributes (``method``, ``forward_evaluations``, ...): ArviZ 0.x keeps
    them on the InferenceData, ArviZ 1.x on every group of the DataTree."""
    attrs = dict(getattr(obj, "attrs", None) or {})
    if posterior is not None:
        attrs.update(posterior.attrs)
    return attrs


def _from_arviz(obj) -> MethodRun:
    posterior = _arviz_group(obj, "posterior")
    if posterior is None:
        raise ValueError("the ArviZ object has no posterior group.")
    samples = {}
    for name, var in posterior.data_vars.items():
        values = np.asarray(var.transpose("chain", "draw", ...).values)
        samples[str(name)] = values.reshape((-1, *values.shape[2:]))
    evaluations, seconds, kind = None, None, "forward"
    history = _arviz_group(obj, "ensemble_history")
    attrs = _run_attrs(obj, posterior)
    if history is not None and "forward_evaluations" in history:
        evaluations = int(np.asarray(history["forward_evaluations"].values)[:, -1].sum())
        if "wall_time" in history:
            # sequential chains each keep their own clock: the run took their sum
            wall = np.asarray(history["wall_time"].values)[:, -1]
            sequential = attrs.get("chain_method") == "sequential"
            seconds = float(wall.sum() if sequential else wall.max())
    elif "forward_evaluations" in attrs:
        evaluations = int(attrs["forward_evaluations"])
    return MethodRun(samples, evaluations, kind, seconds)


def _check_sites(name, samples, reference, sites) -> None:
    """Raises a ValueError naming the result and the site when a compared site is
    missing or its per-draw shape differs from the reference's (a (chains, draws, ...)
    array passed where (draws, ...) is expected is the common cause)."""
    for site in sites:
        if site not in samples:
            raise ValueError(
                f"{name!r} has no site {site!r} (it has {sorted(samples)}); pick the "
                "compared sites with sites=[...]."
            )
        shape = np.shape(samples[site])[1:]
        expected = np.shape(reference[site])[1:]
        if shape != expected:
            raise ValueError(
                f"site {site!r}: {name!r} has draws of shape {shape}, the reference "
                f"{expected}; samples must be laid out (draws, ...), with chains merged "
                "into the draws (get_samples() without group_by_chain)."
            )


def as_method_run(result) -> MethodRun:
    """Normalises a result into a :class:`MethodRun` (draws merged over chains, cost).

    Accepts a :class:`MethodRun`; an :class:`~eki_infer.EKIInference` after ``run``
    (cost: its forward evaluations, i.e. the ensemble or sigma points evaluated to drive
    the updates, summed over chains, and the wall time of its iterations); a
    :class:`~eki_infer.nuts.NUTSResult` (gradient evaluations, seconds); an ArviZ
    ``InferenceData``/``DataTree`` (cost from its ``ensemble_history`` group if it has
    one); a NumPyro ``MCMC`` (no cost); or a dict site → (draws, ...) (no cost).
    """
    from eki_infer.inference import EKIInference
    from eki_infer.nuts import NUTSResult

    if isinstance(result, MethodRun):
        return result
    if isinstance(result, EKIInference):
        if getattr(result, "history", None) is None:
            raise ValueError("the EKIInference object has not been run yet.")
        history = result.history
        evaluations = int(np.asarray(history.forward_evaluations)[:, -1].sum())
        wall = np.asarray(history.wall_time)[:, -1]
        seconds = float(wall.sum() if result.chain_method == "sequential" else wall.max())
        note = f"{result.method.upper()}"
        if result.method != "uki":
            if result.method == "smc":  # its state holds the waste-free pool, not N
                obj = result.inference_data
                members = _run_attrs(obj, _arviz_group(obj, "posterior"))["num_particles"]
            else:
                members = np.shape(result.final_state.particles)[1]
            note += f", J = {members}"
        note += f", {result.num_chains} chain(s), {history.t.shape[1]} iterations"
        return MethodRun(result.get_samples(), evaluations, "forward", seconds, note)
    if isinstance(result, NUTSResult):
        return MethodRun.from_chains(
            result.samples,
            evaluations=int(result.gradient_evaluations),
            kind="gradient",
            seconds=float(result.seconds),
        )
    if _is_arviz(result):
        return _from_arviz(result)
    if hasattr(result, "get_samples") and hasattr(result, "num_samples"):  # numpyro MCMC
        return MethodRun({k: np.asarray(v) for k, v in result.get_samples().items()})
    if isinstance(result, Mapping):
        return MethodRun({k: np.asarray(v) for k, v in result.items()})
    raise TypeError(f"cannot compare an object of type {type(result).__name__}.")


def _default_name(result, index: int) -> str:
    method = getattr(result, "method", None)
    if isinstance(method, str):
        return method.upper()
    if _is_arviz(result):
        attrs = _run_attrs(result, _arviz_group(result, "posterior"))
        if "method" in attrs:
            return str(attrs["method"]).upper()
    return f"method {index}"


def _named_results(results) -> dict:
    # an InferenceData / DataTree is a Mapping of groups, but it is one result
    if isinstance(results, Mapping) and not _is_arviz(results) and not _looks_like_samples(results):
        return dict(results)
    if isinstance(results, (list, tuple)):
        items = list(results)
    else:
        items = [results]
    named = {}
    for i, result in enumerate(items):
        name = _default_name(result, i)
        base, k = name, 2
        while name in named:
            name, k = f"{base} ({k})", k + 1
        named[name] = result
    return named


def _looks_like_samples(mapping: Mapping) -> bool:
    """A dict of arrays is one result (draws), a dict of results is several."""
    return all(
        isinstance(v, (np.ndarray, list, float, int)) or hasattr(v, "shape")
        for v in mapping.values()
    )


# --------------------------------------------------------------------------- result


_KIND_LABEL = {"forward": "forward", "gradient": "gradient", "log_density": "log-density"}


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        reference: name of the reference (``"NUTS"`` by default).
        parameters: scalar parameter names (``theta[0]``, ...).
        methods: names of the compared methods, in order.
        marginal: method → parameter → ``{"mean", "sd", "mean_error", "sd_ratio", "w1",
            "w1_sd"}``: the method's mean and sd; (mean − reference mean) / reference sd;
            sd / reference sd; W1 of the marginals, raw and divided by the reference sd.
        reference_moments: parameter → ``{"mean", "sd"}`` of the reference.
        joint: method → energy distance of the joint draws in reference-sd units.
        noise_floor: the same measures between the two halves of the reference draws
            (``{"max_abs_mean_error", "max_abs_sd_ratio_minus_1", "mean_w1_sd",
            "energy_distance"}``): values of that size are sampling noise.
        cost: name (methods and reference) → ``{"evaluations", "kind", "seconds",
            "fraction_of_reference"}`` (fraction: evaluations / reference evaluations).
        draws: name → (draws, P) matrix of the compared parameters (for plots).
        notes: name → free text (ensemble size, chains, ...).
    """

    reference: str
    parameters: tuple
    methods: tuple
    marginal: dict
    reference_moments: dict
    joint: dict
    noise_floor: dict
    cost: dict
    draws: dict = dataclasses.field(repr=False)
    notes: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Method → headline numbers: worst |mean error|, worst |sd ratio − 1|, mean W1 (sd
        units), energy distance, evaluations, fraction of the reference's, seconds."""
        out = {}
        for method in self.methods:
            rows = self.marginal[method].values()
            cost = self.cost[method]
            out[method] = {
                "max_abs_mean_error": _worst(r["mean_error"] for r in rows),
                "max_abs_sd_ratio_minus_1": _worst(r["sd_ratio"] - 1.0 for r in rows),
                "mean_w1_sd": float(np.mean([r["w1_sd"] for r in rows])),
                "energy_distance": self.joint[method],
                **cost,
            }
        return out

    def to_dict(self) -> dict:
        """Everything but the draws, as JSON-serialisable builtins."""
        return _jsonable(
            {
                "reference": self.reference,
                "parameters": list(self.parameters),
                "methods": list(self.methods),
                "marginal": self.marginal,
                "reference_moments": self.reference_moments,
                "joint": {"energy_distance": self.joint},
                "noise_floor": self.noise_floor,
                "cost": self.cost,
                "summary": self.summary(),
                "notes": self.notes,
            }
        )

    def to_markdown(self, per_parameter: bool = True, digits: int = 3) -> str:
        """A summary table (one row per method, then the reference and its split-half noise
        floor) and, with ``per_parameter``, one row per parameter and method."""
        f = _formatter(digits)
        ref_cost = self.cost[self.reference]
        lines = [
            f"Reference: {self.reference} ({_cost_text(ref_cost)}). Errors in reference-sd "
            "units; energy distance of the joint draws scaled by the reference sd.",
            "",
            "| method | max \\|mean err\\| | max \\|sd ratio − 1\\| | mean W1 | energy dist. "
            "| evaluations | % of ref. | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, s in self.summary().items():
            lines.append(
                f"| {method} | {f(s['max_abs_mean_error'])} | {f(s['max_abs_sd_ratio_minus_1'])} "
                f"| {f(s['mean_w1_sd'])} | {f(s['energy_distance'])} | {_cost_text(s)} "
                f"| {_percent(s['fraction_of_reference'])} | {f(s['seconds'])} |"
            )
        nf = self.noise_floor
        lines.append(
            f"| {self.reference} split halves (noise floor) | {f(nf['max_abs_mean_error'])} "
            f"| {f(nf['max_abs_sd_ratio_minus_1'])} | {f(nf['mean_w1_sd'])} "
            f"| {f(nf['energy_distance'])} | | | |"
        )
        if per_parameter:
            lines += [
                "",
                f"| parameter | {self.reference} mean ± sd | method | mean err | sd ratio "
                "| W1 (sd units) |",
                "|---|---|---|---|---|---|",
            ]
            for p in self.parameters:
                ref = self.reference_moments[p]
                for i, method in enumerate(self.methods):
                    r = self.marginal[method][p]
                    first = f"{p} | {f(ref['mean'])} ± {f(ref['sd'])}" if i == 0 else " | "
                    lines.append(
                        f"| {first} | {method} | {f(r['mean_error'])} | {f(r['sd_ratio'])} "
                        f"| {f(r['w1_sd'])} |"
                    )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def plot(self, **kwargs):
        """:func:`plot_comparison` of this comparison."""
        return plot_comparison(self, **kwargs)


def _formatter(digits: int):
    def f(x):
        if x is None:
            return "–"
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 10 ** (digits + 1) else f"{x:.3e}"

    return f


def _percent(fraction) -> str:
    return "–" if fraction is None else f"{100.0 * fraction:.3g} %"


def _cost_text(cost) -> str:
    if cost.get("evaluations") is None:
        return "cost unknown"
    return f"{cost['evaluations']:,} {_KIND_LABEL.get(cost['kind'], cost['kind'])}"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


# --------------------------------------------------------------------------- compare


def _worst(values) -> float:
    """max |value|, NaN if any value is NaN (Python's max would skip it by position)."""
    return float(np.max(np.abs(np.fromiter(values, dtype=float))))


def _in_sds(value: float, sd: float, target: float = 0.0) -> float:
    """(value − target) / sd; for a reference sd of 0 (a constant), 0 where value equals
    the target and ±inf elsewhere, instead of dividing by a stand-in sd."""
    if sd > 0:
        return float((value - target) / sd)
    return 0.0 if value == target else math.copysign(math.inf, value - target)


def _constant_ratio(sd: float) -> float:
    """The sd ratio against a constant reference: 1 for a constant, inf otherwise."""
    return 1.0 if sd == 0 else math.inf


def _marginal(x: np.ndarray, ref: np.ndarray, ref_sd: np.ndarray) -> dict:
    out = {}
    mean, sd = x.mean(axis=0), x.std(axis=0, ddof=1)
    ref_mean = ref.mean(axis=0)
    for j in range(x.shape[1]):
        w1 = wasserstein_1d(x[:, j], ref[:, j])
        out[j] = {
            "mean": float(mean[j]),
            "sd": float(sd[j]),
            "mean_error": _in_sds(mean[j], ref_sd[j], ref_mean[j]),
            "sd_ratio": float(sd[j] / ref_sd[j]) if ref_sd[j] > 0 else _constant_ratio(sd[j]),
            "w1": w1,
            "w1_sd": _in_sds(w1, ref_sd[j]),
        }
    return out


def _finite_draws(name: str, names, draws: np.ndarray) -> np.ndarray:
    """The draws without rows holding NaN or inf (an EKI/EKS member whose forward run
    failed keeps NaN deterministic sites), with a warning naming the method and the
    parameters; at least 2 must remain."""
    finite = np.all(np.isfinite(draws), axis=1)
    if not finite.all():
        columns = [names[j] for j in np.flatnonzero(~np.all(np.isfinite(draws), axis=0))]
        shown = ", ".join(columns[:5]) + (", ..." if len(columns) > 5 else "")
        warn(
            f"compare: {int((~finite).sum())} of {draws.shape[0]} draws of {name!r} hold "
            f"NaN or inf (in {shown}) and are left out of the comparison.",
            UserWarning,
        )
        draws = draws[finite]
    if draws.shape[0] < 2:
        raise ValueError(
            f"{name!r} has {draws.shape[0]} finite draw(s) of the compared sites; at least "
            "2 are needed for its sds."
        )
    return draws


def _common_sites(reference: MethodRun, runs: dict) -> list:
    sites = []
    for site, values in reference.samples.items():
        if not np.issubdtype(np.asarray(values).dtype, np.floating):
            continue
        if all(site in run.samples for run in runs.values()):
            sites.append(site)
    if not sites:
        raise ValueError("the results and the reference share no continuous site.")
    return sites


def compare(
    model=None,
    *model_args,
    results,
    reference=None,
    rng_key=None,
    sites: Sequence[str] | None = None,
    reference_name: str = "NUTS",
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 1,
    init_strategy=None,
    max_points: int | None = 2000,
    seed: int = 0,
    **model_kwargs,
) -> Comparison:
    """Compares posterior approximations of ``model(*model_args, **model_kwargs)`` with a
    reference, by default NUTS on the same model.

    Args:
        model, model_args, model_kwargs: the conditioned model, as passed to
            ``EKIInference.run`` (e.g. ``compare(model, X, y=y_obs, results=engine)``).
            Only needed when NUTS has to be run.
        results: one result or several (a list, or a dict name → result): anything
            :func:`as_method_run` accepts. Names default to the engine's method
            (``"EKI"``, ``"EKS"``, ``"UKI"``).
        reference: a result to compare against instead of running NUTS (for instance a
            :class:`~eki_infer.nuts.NUTSResult` from :func:`~eki_infer.run_nuts`, or
            draws from an exact posterior as a dict).
        rng_key: key for NUTS (default ``PRNGKey(0)``).
        sites: sites to compare (default: the continuous sites the reference and every
            result have, deterministic sites included).
        reference_name: the reference's name in the table.
        num_warmup, num_samples, num_chains: NUTS settings (NumPyro's defaults of 1000 +
            1000 on one chain).
        init_strategy: NUTS initialisation (default ``init_to_median``, which keeps a
            chain out of minor modes far from the prior's bulk).
        max_points: draws per sample used for the energy distance (subsampled without
            replacement; the marginal measures use all draws).
        seed: seed of that subsampling.

    Draws holding NaN or inf (an EKI or EKS member whose forward run failed keeps NaN
    deterministic sites) are left out, with a warning naming the result and the
    parameters; every result needs 2 finite draws, the reference 4. A parameter that is
    constant in the reference is scored 0 (mean error, W1) and 1 (sd ratio) where the
    result matches it and ±inf where it does not.

    Returns:
        A :class:`Comparison` (``to_markdown()``, ``to_dict()``, ``plot()``).
    """
    named = _named_results(results)
    if not named:
        raise ValueError("compare needs at least one result.")
    runs = {name: as_method_run(result) for name, result in named.items()}
    if reference is None:
        if model is None:
            raise ValueError("compare needs a model to run NUTS on, or a reference.")
        import jax
        from numpyro.infer import init_to_median

        from eki_infer.nuts import run_nuts

        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        start = time.perf_counter()
        nuts = run_nuts(
            model,
            key,
            *model_args,
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            init_strategy=init_to_median if init_strategy is None else init_strategy,
            **model_kwargs,
        )
        ref_run = as_method_run(nuts)
        if ref_run.seconds is None:
            ref_run.seconds = time.perf_counter() - start
    else:
        ref_run = as_method_run(reference)
    if reference_name in runs:
        raise ValueError(f"a result is named like the reference ({reference_name!r}).")

    site_list = _common_sites(ref_run, runs) if sites is None else list(sites)
    for name, run in {reference_name: ref_run, **runs}.items():
        _check_sites(name, run.samples, ref_run.samples, site_list)
    names, ref_draws = flatten_samples(ref_run.samples, site_list)
    ref_draws = _finite_draws(reference_name, names, ref_draws)
    if ref_draws.shape[0] < 4:
        raise ValueError(
            f"the reference {reference_name!r} has {ref_draws.shape[0]} draws; it needs at "
            "least 4 (its two halves give the comparison's noise floor)."
        )
    ref_sd = ref_draws.std(axis=0, ddof=1)
    unit = np.where(ref_sd > 0, ref_sd, 1.0)  # the energy distance's scale: constants as is
    ref_mean = ref_draws.mean(axis=0)

    draws = {reference_name: ref_draws}
    marginal, joint, cost, notes = {}, {}, {}, {}
    ref_evals = ref_run.evaluations
    for name, run in runs.items():
        _, x = flatten_samples(run.samples, site_list)
        x = _finite_draws(name, names, x)
        draws[name] = x
        per_param = _marginal(x, ref_draws, ref_sd)
        marginal[name] = {names[j]: per_param[j] for j in range(len(names))}
        joint[name] = energy_distance(x, ref_draws, unit, max_points, seed)
        cost[name] = _cost(run, ref_evals)
        if run.note:
            notes[name] = run.note
    cost[reference_name] = _cost(ref_run, ref_evals)
    if ref_run.note:
        notes[reference_name] = ref_run.note

    half = ref_draws.shape[0] // 2
    first, second = ref_draws[:half], ref_draws[half : 2 * half]
    floor = _marginal(first, second, ref_sd)
    noise_floor = {
        "max_abs_mean_error": _worst(r["mean_error"] for r in floor.values()),
        "max_abs_sd_ratio_minus_1": _worst(r["sd_ratio"] - 1.0 for r in floor.values()),
        "mean_w1_sd": float(np.mean([r["w1_sd"] for r in floor.values()])),
        "energy_distance": energy_distance(first, second, unit, max_points, seed),
    }
    return Comparison(
        reference=reference_name,
        parameters=tuple(names),
        methods=tuple(runs),
        marginal=marginal,
        reference_moments={
            names[j]: {"mean": float(ref_mean[j]), "sd": float(ref_sd[j])}
            for j in range(len(names))
        },
        joint=joint,
        noise_floor=noise_floor,
        cost=cost,
        draws=draws,
        notes=notes,
    )


def _cost(run: MethodRun, ref_evals) -> dict:
    fraction = None
    if run.evaluations is not None and ref_evals:
        fraction = run.evaluations / ref_evals
    return {
        "evaluations": run.evaluations,
        "kind": run.kind,
        "seconds": run.seconds,
        "fraction_of_reference": fraction,
    }


# --------------------------------------------------------------------------- plotting


def plot_comparison(
    comparison: Comparison,
    parameters: Sequence[str] | None = None,
    max_parameters: int = 6,
    methods: Sequence[str] | None = None,
    bins: int = 40,
    max_points: int = 500,
    figsize=None,
    seed: int = 0,
):
    """Overlaid marginals (diagonal) and pair plots (lower triangle) of every method and
    the reference; returns the matplotlib ``Figure``.

    ``parameters``: which ones (default: the first ``max_parameters``); ``methods``: which
    methods (default: all); ``max_points``: draws per method in the scatter plots.
    Needs matplotlib (``pip install eki_infer[plot]``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_comparison needs matplotlib: pip install 'eki_infer[plot]'."
        ) from err

    params = list(comparison.parameters[:max_parameters] if parameters is None else parameters)
    index = [comparison.parameters.index(p) for p in params]
    names = [comparison.reference, *(comparison.methods if methods is None else methods)]
    p = len(params)
    size = figsize or (max(3.0, 2.4 * p), max(2.6, 2.4 * p))
    fig, axes = plt.subplots(p, p, figsize=size, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2"])
    rng = np.random.default_rng(seed)
    style = {}
    for k, name in enumerate(names):
        if k == 0:
            style[name] = {"color": "black", "lw": 2.0}
        else:
            style[name] = {"color": colors[(k - 1) % len(colors)], "lw": 1.3}
    for i in range(p):
        for j in range(p):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                ref = comparison.draws[comparison.reference][:, index[i]]
                lo, hi = np.quantile(ref, [0.001, 0.999])
                pad = 0.25 * (hi - lo)
                all_x = np.concatenate([comparison.draws[n][:, index[i]] for n in names])
                lo = max(lo - pad, np.quantile(all_x, 0.002))
                hi = min(hi + pad, np.quantile(all_x, 0.998))
                edges = np.linspace(lo, hi, bins + 1)
                for name in names:
                    ax.hist(
                        comparison.draws[name][:, index[i]],
                        bins=edges,
                        density=True,
                        histtype="step",
                        label=name,
                        **style[name],
                    )
                ax.set_yticks([])
            else:
                for name in names:
                    d = _subsample(comparison.draws[name], max_points, rng)
                    ax.scatter(
                        d[:, index[j]],
                        d[:, index[i]],
                        s=3,
                        alpha=0.35,
                        color=style[name]["color"],
                        rasterized=True,
                    )
            if i == p - 1:
                ax.set_xlabel(params[j])
            if j == 0 and i > 0:
                ax.set_ylabel(params[i])
    axes[0, 0].legend(fontsize="small", loc="best")
    if p == 1:
        axes[0, 0].set_xlabel(params[0])
    fig.tight_layout()
    return fig

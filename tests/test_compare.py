"""eki_infer.compare: the metrics against known distances between known distributions,
the bookkeeping of the comparison table, and one small end-to-end comparison."""

import json
import math

import jax
import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial.distance import cdist

from eki_infer.compare import (
    Comparison,
    MethodRun,
    _default_name,
    as_method_run,
    compare,
    energy_distance,
    flatten_samples,
    plot_comparison,
    wasserstein_1d,
)

# ----------------------------------------------------------------------------- W1


def _normal_quantiles(n):
    """A deterministic 'sample' of N(0, 1): its quantiles at (i + 1/2) / n."""
    return stats.norm.ppf((np.arange(n) + 0.5) / n)


def test_w1_matches_scipy_on_unequal_samples():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (7, 13), (500, 333), (1000, 1000)]:
        x, y = rng.standard_t(3, n), rng.normal(0.5, 2.0, m)
        assert wasserstein_1d(x, y) == pytest.approx(stats.wasserstein_distance(x, y), rel=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.3, -1.7, 5.0])
def test_w1_of_a_shift_is_the_shift(mu):
    x = np.random.default_rng(1).normal(size=5000)
    # the same sample shifted: exactly |mu|
    assert wasserstein_1d(x, x + mu) == pytest.approx(abs(mu), abs=1e-12)
    # independent samples of N(0, 1) and N(mu, 1): |mu| up to sampling error
    y = np.random.default_rng(2).normal(mu, 1.0, 20000)
    assert wasserstein_1d(x, y) == pytest.approx(abs(mu), abs=0.05)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_w1_of_a_scale_change(sigma):
    """W1(N(0, 1), N(0, σ²)) = |σ − 1| E|Z| = |σ − 1| sqrt(2/π)."""
    q = _normal_quantiles(100_000)
    expected = abs(sigma - 1.0) * math.sqrt(2.0 / math.pi)
    assert wasserstein_1d(q, sigma * q) == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- energy


def _mean_abs_normal(m, s):
    """E|Z| for Z ~ N(m, s²)."""
    return s * math.sqrt(2.0 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (
        1.0 - 2.0 * stats.norm.cdf(-m / s)
    )


def _mean_norm_gaussian(shift, d, var):
    """E‖Z‖ for Z ~ N(m, var I_d) with ‖m‖ = shift: scaled noncentral-chi mean."""
    lam2 = shift**2 / var
    log_ratio = special.gammaln((d + 1) / 2) - special.gammaln(d / 2)
    return math.sqrt(2.0 * var) * math.exp(log_ratio) * special.hyp1f1(-0.5, d / 2, -lam2 / 2)


def _energy_closed_form(shift, d):
    """2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ for X ~ N(0, I_d), Y ~ N(shift e₁, I_d)."""
    return 2 * _mean_norm_gaussian(shift, d, 2.0) - 2 * _mean_norm_gaussian(0.0, d, 2.0)


def test_energy_closed_form_helpers_agree():
    # 1-D: the noncentral-chi route and the folded-normal route give the same E|X − Y|
    for mu in [0.0, 0.4, 2.5]:
        assert _mean_norm_gaussian(mu, 1, 2.0) == pytest.approx(
            _mean_abs_normal(mu, math.sqrt(2.0)), rel=1e-10
        )


def test_energy_distance_is_the_exact_u_statistic():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 3)), rng.normal(0.3, 1.2, size=(45, 3))
    dxy = cdist(x, y).mean()
    dxx = cdist(x, x).sum() / (60 * 59)
    dyy = cdist(y, y).sum() / (45 * 44)
    assert energy_distance(x, y, max_points=None) == pytest.approx(2 * dxy - dxx - dyy, rel=1e-12)
    # scaling both samples by s is the same as dividing the distance by s... per coordinate
    scale = np.array([2.0, 0.5, 1.0])
    assert energy_distance(x, y, scale=scale, max_points=None) == pytest.approx(
        energy_distance(x / scale, y / scale, max_points=None), rel=1e-12
    )


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_energy_distance_of_shifted_gaussians(d, shift):
    # exact first and second moments per coordinate remove most of the sampling noise
    # (an error δ in the sample means moves D² by about δ · ∂D²/∂shift)
    x = _standardised(np.random.default_rng(10 + d), (2000, d))
    y = _standardised(np.random.default_rng(20 + d), (2000, d))
    y[:, 0] += shift
    expected = _energy_closed_form(shift, d)
    assert energy_distance(x, y) == pytest.approx(expected, rel=0.02, abs=0.01)
    if shift == 0.0:
        assert abs(energy_distance(x, y)) < 0.01


def test_energy_distance_subsamples_to_max_points():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5000, 2)), rng.normal(1.0, 1.0, size=(4000, 2))
    sub = energy_distance(x, y, max_points=500, seed=1)
    assert sub == pytest.approx(_energy_closed_form(math.sqrt(2.0), 2), abs=0.15)
    assert sub == energy_distance(x, y, max_points=500, seed=1)  # reproducible


# ----------------------------------------------------------------------------- table


def _standardised(rng, shape):
    z = rng.normal(size=shape)
    return (z - z.mean(axis=0)) / z.std(axis=0, ddof=1)


def test_flatten_samples_names():
    samples = {"a": np.zeros(4), "b": np.zeros((4, 2)), "c": np.zeros((4, 2, 3))}
    names, draws = flatten_samples(samples)
    assert names[:3] == ["a", "b[0]", "b[1]"]
    assert names[3:5] == ["c[0,0]", "c[0,1]"] and names[-1] == "c[1,2]"
    assert draws.shape == (4, 9)
    with pytest.raises(ValueError, match="draws"):
        flatten_samples({"a": np.zeros(3), "b": np.zeros(4)})


def test_mean_error_and_sd_ratio_are_exact():
    rng = np.random.default_rng(5)
    z = _standardised(rng, (4000, 2))
    ref = {"theta": np.array([1.0, -2.0]) + np.array([2.0, 0.5]) * z, "s": 3.0 + z[:, 0]}
    w = _standardised(np.random.default_rng(6), (3000, 2))
    method = {
        "theta": np.array([1.0 + 0.3 * 2.0, -2.0 - 0.1 * 0.5]) + np.array([2.4, 0.45]) * w,
        "s": 3.0 + w[:, 1],
    }
    comp = compare(results={"A": MethodRun(method, 120, "forward", 0.5)}, reference=ref)
    assert comp.parameters == ("theta[0]", "theta[1]", "s")
    m = comp.marginal["A"]
    assert m["theta[0]"]["mean_error"] == pytest.approx(0.3, abs=1e-12)
    assert m["theta[1]"]["mean_error"] == pytest.approx(-0.1, abs=1e-12)
    assert m["theta[0]"]["sd_ratio"] == pytest.approx(1.2, abs=1e-12)
    assert m["theta[1]"]["sd_ratio"] == pytest.approx(0.9, abs=1e-12)
    assert m["s"]["mean_error"] == pytest.approx(0.0, abs=1e-12)
    assert m["s"]["sd_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert m["theta[0]"]["w1"] == pytest.approx(2.0 * m["theta[0]"]["w1_sd"])
    assert comp.reference_moments["theta[0]"]["sd"] == pytest.approx(2.0)
    summary = comp.summary()["A"]
    assert summary["max_abs_mean_error"] == pytest.approx(0.3)
    assert summary["max_abs_sd_ratio_minus_1"] == pytest.approx(0.2)
    # the reference has no cost here, so no fraction
    assert comp.cost["A"]["evaluations"] == 120 and comp.cost["A"]["fraction_of_reference"] is None
    # a method equal to the reference is at distance ~0
    same = compare(results={"ref": ref}, reference=ref, reference_name="R")
    assert same.joint["ref"] < 1e-12 and same.marginal["ref"]["s"]["w1"] == 0.0


def test_results_normalisation_and_outputs():
    rng = np.random.default_rng(7)
    ref = MethodRun.from_chains(
        {"x": rng.normal(size=(2, 500))}, evaluations=10_000, kind="gradient", seconds=2.0
    )
    assert ref.samples["x"].shape == (1000,)
    a = MethodRun({"x": rng.normal(0.1, 1.0, 400)}, 500, "forward", 0.1, note="J = 100")
    b = {"x": rng.normal(0.0, 1.5, 400)}
    comp = compare(results=[a, b], reference=ref)
    assert comp.methods == ("method 0", "method 1")
    assert comp.cost["method 0"]["fraction_of_reference"] == pytest.approx(0.05)
    assert comp.cost["NUTS"]["evaluations"] == 10_000
    assert comp.notes["method 0"] == "J = 100"
    d = json.loads(json.dumps(comp.to_dict()))
    assert d["summary"]["method 1"]["max_abs_sd_ratio_minus_1"] == pytest.approx(
        comp.summary()["method 1"]["max_abs_sd_ratio_minus_1"]
    )
    text = comp.to_markdown()
    assert "method 1" in text and "noise floor" in text and "10,000 gradient" in text
    assert "| x |" in text
    assert isinstance(as_method_run(b), MethodRun)
    with pytest.raises(TypeError):
        as_method_run(3.0)
    with pytest.raises(ValueError, match="model"):
        compare(results=b)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def linear_comparison():
    from eki_infer import EKIInference
    from models import linear_gaussian

    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0))
    engine = EKIInference(
        linear_gaussian.model, method="eki", ensemble_size=200, num_chains=1, progress_bar=False
    )
    engine.run(jax.random.PRNGKey(1), *args, y=y)
    comp = compare(
        linear_gaussian.model,
        *args,
        y=y,
        results={"EKI": engine, "EKI (ArviZ)": engine.inference_data},
        rng_key=jax.random.PRNGKey(2),
        num_warmup=300,
        num_samples=600,
    )
    mean, cov = linear_gaussian.exact_posterior(*args, y)
    return engine, comp, mean, cov


def test_end_to_end_linear_gaussian(linear_comparison):
    engine, comp, mean, cov = linear_comparison
    assert comp.parameters == tuple(f"theta[{i}]" for i in range(5))
    # NUTS itself is close to the closed form
    nuts = comp.draws["NUTS"]
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(nuts.mean(axis=0) - mean) / sd < 0.3)
    # EKI with J = 200 is within Monte-Carlo error of NUTS
    s = comp.summary()["EKI"]
    assert s["max_abs_mean_error"] < 0.4
    assert s["max_abs_sd_ratio_minus_1"] < 0.3
    assert s["mean_w1_sd"] < 0.3
    assert s["energy_distance"] < 0.1
    # cost: 200 members per update, gradient evaluations for NUTS
    evals = int(engine.history.forward_evaluations[0, -1])
    assert comp.cost["EKI"]["evaluations"] == evals and evals % 200 == 0
    assert comp.cost["EKI"]["kind"] == "forward" and comp.cost["EKI"]["seconds"] > 0
    assert comp.cost["NUTS"]["kind"] == "gradient" and comp.cost["NUTS"]["evaluations"] > 900
    assert comp.cost["EKI"]["fraction_of_reference"] == pytest.approx(
        evals / comp.cost["NUTS"]["evaluations"]
    )
    # the ArviZ object of the same run gives the same table
    assert comp.marginal["EKI (ArviZ)"] == comp.marginal["EKI"]
    assert comp.cost["EKI (ArviZ)"]["evaluations"] == evals
    assert isinstance(comp, Comparison)
    # without its history group, the ArviZ object still names its method and cost
    # (ArviZ 0.x keeps run attributes on the InferenceData, 1.x on every group)
    idata = engine.inference_data
    if hasattr(idata, "children"):  # DataTree
        bare = idata.copy()
        del bare["ensemble_history"]
    else:
        bare = idata.copy()
        del bare.ensemble_history
    assert _default_name(bare, 0) == "EKI"
    assert as_method_run(bare).evaluations == evals


def test_plot_comparison(linear_comparison):
    plt = pytest.importorskip("matplotlib.pyplot")
    _, comp, _, _ = linear_comparison
    fig = plot_comparison(comp, max_parameters=3)
    assert len(fig.axes) == 9
    plt.close(fig)
    fig = comp.plot(parameters=["theta[1]"], methods=["EKI"])
    assert len(fig.axes) == 1
    plt.close(fig)


def test_a_bare_arviz_object_is_one_result(linear_comparison):
    """An InferenceData (ArviZ 0.x) or DataTree (1.x) is a mapping of groups, yet one
    result: passed on its own (not in a dict) it is compared as such."""
    engine, _, mean, cov = linear_comparison
    reference = {"theta": np.random.default_rng(0).multivariate_normal(mean, cov, 4000)}
    comp = compare(results=engine.inference_data, reference=reference)
    summary = comp.summary()
    assert len(summary) == 1
    row = next(iter(summary.values()))
    # the bounds of test_end_to_end_linear_gaussian: EKI with J = 200 against NUTS
    assert row["max_abs_mean_error"] < 0.4 and row["max_abs_sd_ratio_minus_1"] < 0.3


def test_mismatched_or_missing_sites_are_named():
    rng = np.random.default_rng(3)
    result = {"a": rng.normal(size=300)}
    # a (chains, draws) reference where (draws,) is expected
    with pytest.raises(ValueError, match=r"site 'a'.*shape \(\).*\(100,\).*\(draws, \.\.\.\)"):
        compare(results={"run": result}, reference={"a": rng.normal(size=(4, 100))})
    with pytest.raises(ValueError, match=r"'run' has no site 'b'"):
        reference = {"a": rng.normal(size=400), "b": rng.normal(size=400)}
        compare(results={"run": result}, reference=reference, sites=["a", "b"])
    with pytest.raises(ValueError, match="has 3 draws; it needs at least 4"):
        compare(results={"run": result}, reference={"a": rng.normal(size=3)})


def test_non_finite_draws_are_left_out_with_a_warning_naming_the_site():
    """A failed EKI member keeps NaN in its deterministic sites. Python's max skipped a
    NaN by position, so the summary's worst columns could hide such a parameter."""
    rng = np.random.default_rng(7)
    reference = {"a": rng.normal(size=1000), "z": rng.normal(size=1000)}
    z = rng.normal(size=500)
    z[3] = np.nan
    method = {"a": 0.5 + rng.normal(size=500), "z": z}
    for sites in (["a", "z"], ["z", "a"]):
        with pytest.warns(UserWarning, match=r"1 of 500 draws of 'run' hold NaN or inf \(in z\)"):
            comp = compare(results={"run": method}, reference=reference, sites=sites)
        summary = comp.summary()["run"]
        assert np.isfinite(summary["energy_distance"]) and np.isfinite(summary["mean_w1_sd"])
        kept = np.delete(method["a"], 3)  # the draw whose z is NaN goes as a whole
        expected = abs(np.mean(kept) - np.mean(reference["a"])) / np.std(reference["a"], ddof=1)
        assert summary["max_abs_mean_error"] == pytest.approx(expected, rel=1e-12)
        assert comp.draws["run"].shape == (499, 2)
    with pytest.raises(ValueError, match=r"'run' has 1 finite draw\(s\)"):
        compare(results={"run": {"a": np.array([0.3])}}, reference={"a": rng.normal(size=50)})
    with pytest.raises(ValueError, match=r"'run' has 0 finite draw"):
        compare(results={"run": {"a": np.zeros(0)}}, reference={"a": rng.normal(size=50)})


def test_a_constant_parameter_is_matched_not_scored_against_a_stand_in_sd():
    rng = np.random.default_rng(8)
    reference = {"a": rng.normal(size=400), "c": np.ones(400)}
    same = compare(
        results={"run": {"a": rng.normal(size=300), "c": np.ones(300)}}, reference=reference
    )
    c = same.marginal["run"]["c"]
    assert (c["mean_error"], c["sd_ratio"], c["w1_sd"]) == (0.0, 1.0, 0.0)
    assert same.reference_moments["c"]["sd"] == 0.0
    off = compare(
        results={"run": {"a": rng.normal(size=300), "c": 1.0 + rng.normal(size=300)}},
        reference=reference,
    )
    assert off.marginal["run"]["c"]["sd_ratio"] == math.inf


def test_distances_check_their_input():
    x, y = np.random.default_rng(9).normal(size=(2, 50, 3))
    with pytest.raises(ValueError, match=r"1-D samples, got shapes \(50, 3\)"):
        wasserstein_1d(x, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        wasserstein_1d(np.array([0.0, np.nan]), np.zeros(3))
    with pytest.raises(ValueError, match="at least two points per sample"):
        energy_distance(np.zeros((0, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="max_points must be None or at least 2"):
        energy_distance(x, y, max_points=0)
    with pytest.raises(ValueError, match=r"scale must be positive and finite, of shape \(3,\)"):
        energy_distance(x, y, scale=np.ones(2))
    with pytest.raises(ValueError, match="scale must be positive"):
        energy_distance(x, y, scale=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        energy_distance(x, np.where(y > 2, np.nan, y))


def test_sequential_chains_report_their_summed_wall_time():
    """With chain_method='sequential' each chain keeps its own clock: the engine and its
    ArviZ object report the same seconds, the sum over chains."""
    from eki_infer import EKIInference
    from models import linear_gaussian

    args, y = linear_gaussian.simulate_data(jax.random.PRNGKey(0))
    engine = EKIInference(
        linear_gaussian.model,
        method="eki",
        ensemble_size=50,
        num_chains=3,
        chain_method="sequential",
        progress_bar=False,
    )
    engine.run(jax.random.PRNGKey(1), *args, y=y)
    total = float(engine.history.wall_time[:, -1].sum())
    assert as_method_run(engine).seconds == pytest.approx(total)
    assert as_method_run(engine.inference_data).seconds == pytest.approx(total)

"""Perturbed EKI against ES-MDA from iterative-ensemble-smoother (the Python peer).

With the same observation perturbations, one ES-MDA assimilation with α = [1] and our
perturbed EKI step give the same posterior ensemble to rounding on a linear problem,
once the covariance normalisations are matched: ES-MDA uses 1/(J − 1), eki_infer 1/J,
so our Δt corresponds to α = J / ((J − 1) Δt). Checked both ways (our Δt = J/(J − 1)
with α = 1, and our Δt = 1 with ESMDA's α set to J/(J − 1)), for J ≤ M and J > M, for
diagonal and dense Γ; the control that ignores the normalisation must disagree.

Skipped unless ``iterative_ensemble_smoother`` is importable (it needs Python ≥ 3.12).
The helper is the benchmark's own :func:`process_updates.ies_agreement`.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("iterative_ensemble_smoother")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import process_updates as bench  # noqa: E402


@pytest.mark.parametrize(
    ("d", "m", "j", "noise"),
    [
        (50, 30, 100, "diagonal"),  # J > M: our M × M solve; ES-MDA keeps M singular values
        (20, 60, 50, "diagonal"),  # J ≤ M: our J × J solve; d < J
        (20, 60, 50, "dense"),  # dense Γ (our Cholesky whitening, its triangular solves)
    ],
)
def test_perturbed_eki_matches_esmda(d, m, j, noise):
    res = bench.ies_agreement(d, m, j, noise=noise, seed=d + m + j)
    for variant in ("dt_J", "dt_1"):
        assert res[f"{variant}_rel_update"] < 1e-10, res
        assert res[f"{variant}_rel_max"] < 1e-10, res
    # Without the 1/(J-1) vs 1/J correction the two updates differ by O(1/J).
    assert res["naive_rel_update"] > 1e-4, res

"""The README's main job: `python -m eki_infer demo` runs all methods and writes its figure
(here at a reduced size)."""

from eki_infer.__main__ import main


def test_demo_runs_and_writes_the_figure(tmp_path, capsys):
    status = main(
        [
            "demo",
            "--output-dir",
            str(tmp_path),
            "--ensemble-size",
            "20",
            "--num-chains",
            "1",
            "--nuts-warmup",
            "50",
            "--nuts-samples",
            "50",
            "--no-progress",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    for row in ("EKI", "EKS", "UKI", "NUTS", "exact"):
        assert row in out
    assert (tmp_path / "exp_sine_marginals.png").stat().st_size > 0

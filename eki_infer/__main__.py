"""Command line: ``python -m eki_infer demo`` (also installed as ``eki-infer demo``)."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eki-infer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="calibrate the exponential-sine model with EKI, EKS, UKI and NUTS"
    )
    demo.add_argument("--output-dir", default="demo_output", help="where the figure goes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--ensemble-size", type=int, default=200)
    demo.add_argument("--num-chains", type=int, default=2)
    demo.add_argument("--nuts-warmup", type=int, default=1000)
    demo.add_argument("--nuts-samples", type=int, default=1000)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--float32", action="store_true", help="run in single precision")
    args = parser.parse_args(argv)

    if args.command == "demo":
        import numpyro

        if not args.float32:
            numpyro.enable_x64()
        from eki_infer.demo import run_demo

        run_demo(
            args.output_dir,
            seed=args.seed,
            ensemble_size=args.ensemble_size,
            num_chains=args.num_chains,
            nuts_warmup=args.nuts_warmup,
            nuts_samples=args.nuts_samples,
            progress_bar=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

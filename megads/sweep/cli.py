"""CLI commands `megads sweep SWEEP.yaml` and `megads plot RUN_DIR…` (registered by megads/cli.py)."""
from __future__ import annotations


def _cmd_sweep(args) -> int:
    from megads.sweep.runner import run_sweep

    return run_sweep(args.sweep, args.set, force=args.force, point=args.point, collect=not args.no_collect,
                     run=not args.collect, list_points=args.list, count=args.count)


def _cmd_plot(args) -> int:
    from megads.sweep.runplot import plot_runs

    path = plot_runs(args.run_dirs, args.out)
    print(f"wrote {path}")
    return 0


def add_subcommands(subparsers) -> None:
    """Add `sweep` and `plot` to the main CLI's subparsers."""
    sp = subparsers.add_parser(
        "sweep", help="train the points of a sweep (grid/list of --set overrides x seeds), resumable; write "
                      "results.csv, fit.json (loss vs compute, compute-optimal size) and plots")
    sp.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml; its docstring: megads/sweep/spec.py)")
    sp.add_argument("--set", action="append", default=[], metavar="sweep.KEY=VALUE",
                    help="override a key of the sweep section, e.g. sweep.output_dir=runs/x or sweep.seeds=[1] "
                         "(repeatable)")
    sp.add_argument("--point", default=None, metavar="I|NAME",
                    help="run only this point (index or name; a SLURM array task: launch/sweep.sbatch); no collect")
    sp.add_argument("--collect", action="store_true",
                    help="run nothing: gather the finished points into results.csv, fit.json, summary.md and plots")
    sp.add_argument("--no-collect", action="store_true", help="run the points, skip the results/fit/plots")
    sp.add_argument("--list", action="store_true", help="list the points (index, name, state, overrides) and exit")
    sp.add_argument("--count", action="store_true", help="print the number of points and exit (SLURM --array size)")
    sp.add_argument("--force", action="store_true",
                    help="rerun every point from scratch (their previous output is removed by `megads train --force`)")
    sp.set_defaults(func=_cmd_sweep)

    pp = subparsers.add_parser("plot", help="a PNG report of runs: loss (train, valid), lr, grad norm, tokens/s, "
                                            "expert-load heatmaps, from metrics.jsonl; several runs on one figure")
    pp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's train.output_dir (holds metrics.jsonl)")
    pp.add_argument("--out", default=None, metavar="FILE.png",
                    help="where to write (default: RUN_DIR/report.png for one run, ./report.png for several)")
    pp.set_defaults(func=_cmd_plot)

"""The ``medvlm-fl`` console script: the library's commands plus the federation's.

    medvlm-fl simulate [--config PRESET] [--run-dir DIR | --name NAME] [key=value ...]
    medvlm-fl build-foundation | train-local | evaluate   (see medvlm.cli)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from medvlm import cli as library_cli


def _simulate(args: argparse.Namespace) -> int:
    from medvlm.config import load_config
    from simulations.run import simulate

    run_dir = args.run_dir
    if run_dir is None and args.name:
        run_dir = Path(load_config(args.config, list(args.overrides)).output_dir) / args.name
    summary = simulate(args.config, list(args.overrides), run_dir=run_dir, cpus_per_hospital=args.cpus_per_hospital,
                       gpus_per_hospital=args.gpus_per_hospital)
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from rich.console import Console

    table = library_cli.accuracy_table(f"federation -> {s['run_dir']} ({s['rounds']} rounds, {s['stopped']})", s,
                                       model_label="global model")
    console = Console()
    console.print(table)
    for name, p in s["privacy"].items():
        console.print(f"{name}: epsilon {p['epsilon']:.2f} (budget {p.get('budget')}) at delta {p['delta']:g}; "
                      f"sigma {p['noise_multiplier']:.3f}, q {p['sample_rate']:.4f}, {p['steps']} DP-SGD steps")
    console.print(f"{s['bytes_sent_per_round'] / 1024:.0f} KiB sent per hospital per round; "
                  f"{s['rejected_updates']} rejected updates; {s['wall_seconds']:.0f}s; plots: {s['run_dir']}/plots.png")


def _add_federation_commands(sub) -> None:
    p = sub.add_parser("simulate", help="run (or resume) a local federation of synthetic hospitals (Flower simulation)")
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run-dir", help="run folder; if it holds a checkpoint, the federation resumes from it")
    where.add_argument("--name", help="run folder name under output_dir (default: a timestamp)")
    p.add_argument("--cpus-per-hospital", type=float, default=1.0, help="Ray resources per simulated hospital")
    p.add_argument("--gpus-per-hospital", type=float, default=0.0, help="e.g. 0.5 puts two hospitals on one GPU")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. federation.rounds=5 privacy.target_epsilon=4")
    p.set_defaults(func=_simulate)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = library_cli.build_parser(_add_federation_commands, description=__doc__ + (library_cli.__doc__ or ""))
    return library_cli.main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())

"""The ``medvlm-fl`` console script: the library's commands plus the federation's.

    medvlm-fl simulate [--config PRESET] [--run-dir DIR | --name NAME] [key=value ...]
    medvlm-fl certs --host NAME_OR_IP [--host ...] --out DIR [--force]   (coordinator: CA + SuperLink TLS)
    medvlm-fl node-key --name HOSPITAL --out DIR                        (hospital: node-auth key pair)
    medvlm-fl superlink --certs DIR [--host H] [--port P]               (coordinator: TLS + node auth)
    medvlm-fl supernode --superlink H:P --ca ca.crt --key KEY --hospital NAME --data-path M --state-dir D
    medvlm-fl build-foundation | train-local | evaluate   (see medvlm.cli)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from medvlm import cli as library_cli
from medvlm.config import DATA_FORMATS


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


def _certs(args: argparse.Namespace) -> int:
    from server.certs import create_certificates

    paths = create_certificates(args.out, args.host, force=args.force)
    print(f"{'created' if paths.ca_created else 'reused'} CA {paths.ca_cert} (give this file to every hospital; "
          f"keep {paths.ca_key.name} private)")
    print(f"SuperLink certificate for {', '.join(args.host)}: {paths.server_cert} + {paths.server_key}")
    print(f"start: flower-superlink --ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.server_cert} "
          f"--ssl-keyfile {paths.server_key} --enable-supernode-auth ...   (see docs/deploy.md)")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from client.keys import create_node_key

    private, public = create_node_key(args.out, args.name)
    print(f"private key {private} (stays here: flower-supernode --auth-supernode-private-key {private})")
    print(f"public key  {public} (send to the coordinator: flwr supernode register {public} <connection> "
          f"--name {args.name})")
    return 0


def _exec(cmd: list[str], dry_run: bool) -> int:
    """Print the Flower command, then become it (signals and exit codes are Flower's own)."""
    import os
    import shlex
    import shutil

    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    binary = shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0])
    os.execv(binary, cmd)
    return 1  # not reached


def _superlink(args: argparse.Namespace) -> int:
    from server.deploy import superlink_command

    cmd = superlink_command(certs=args.certs, host=args.host, port=args.port, database=args.database,
                            insecure=args.insecure)
    if args.database and not args.dry_run:
        Path(args.database).parent.mkdir(parents=True, exist_ok=True)
    return _exec(cmd, args.dry_run)


def _supernode(args: argparse.Namespace) -> int:
    from client.deploy import supernode_command

    stage_data = {}
    for item in args.stage_data or []:
        stage, sep, path = item.partition("=")
        if not sep or not stage or not path:
            raise ValueError(f"--stage-data {item!r}: use STAGE=PATH, e.g. align=/data/reports")
        stage_data[stage] = path
    return _exec(supernode_command(superlink=args.superlink, hospital=args.hospital, data_path=args.data_path,
                                   data_format=args.data_format, state_dir=args.state_dir, ca=args.ca, key=args.key, port=args.port,
                                   device=args.device, epsilon=args.epsilon, delta=args.delta,
                                   insecure=args.insecure, stage_data=stage_data), args.dry_run)


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

    p = sub.add_parser("certs", help="coordinator: create the consortium CA and the SuperLink's TLS certificate")
    p.add_argument("--host", action="append", required=True,
                   help="DNS name or IP address hospitals use to reach the SuperLink (repeat for several)")
    p.add_argument("--out", default="certs", help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--force", action="store_true", help="replace an existing server certificate (the CA is kept)")
    p.set_defaults(func=_certs)

    p = sub.add_parser("node-key", help="hospital: create the SuperNode's authentication key pair")
    p.add_argument("--name", required=True, help="hospital name (also the key's file name)")
    p.add_argument("--out", default="keys", help="folder for NAME (private) and NAME.pub")
    p.set_defaults(func=_node_key)

    p = sub.add_parser("superlink", help="coordinator: start Flower's SuperLink with TLS and node authentication")
    p.add_argument("--certs", help="folder from `medvlm-fl certs` (ca.crt, server.pem, server.key)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9092, help="the one port hospitals and `flwr run` connect to")
    p.add_argument("--database", default="superlink-state/superlink.db",
                   help="SuperLink state (registered hospitals, runs) that survives a restart")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (closed test networks)")
    p.add_argument("--dry-run", action="store_true", help="print the flower-superlink command, do not start it")
    p.set_defaults(func=_superlink)

    p = sub.add_parser("supernode", help="hospital: check the site, then start Flower's SuperNode (TLS + node auth)")
    p.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--ca", help="the consortium's ca.crt (from the coordinator)")
    p.add_argument("--key", help="this hospital's private key (from `medvlm-fl node-key`)")
    p.add_argument("--hospital", required=True, help="this hospital's name (logs, ledger, the coordinator's tables)")
    p.add_argument("--data-path", required=True, help="the data folder or manifest (see `medvlm-fl check-data`)")
    p.add_argument("--data-format", default="auto", choices=list(DATA_FORMATS),
                   help="the data folder's format (default: recognised from its files)")
    p.add_argument("--state-dir", required=True, help="folder for the privacy ledger; must survive restarts")
    p.add_argument("--stage-data", action="append", metavar="STAGE=PATH",
                   help="another data folder for one curriculum stage (federation.stages), e.g. align=/data/reports")
    p.add_argument("--device", help="e.g. cuda:0 (default: the run config's train.device)")
    p.add_argument("--epsilon", type=float, help="this hospital's privacy budget (default: privacy.target_epsilon)")
    p.add_argument("--delta", type=float, help="default: privacy.delta")
    p.add_argument("--port", type=int, default=9094, help="local port for the ClientApp runtime (one per SuperNode "
                                                          "on a machine; not opened to the network)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (closed test networks)")
    p.add_argument("--dry-run", action="store_true", help="check and print the flower-supernode command only")
    p.set_defaults(func=_supernode)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = library_cli.build_parser(_add_federation_commands, description=__doc__ + (library_cli.__doc__ or ""))
    return library_cli.main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())

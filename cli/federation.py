"""The federation's and the deployment's commands of ``medvlm-fl`` (cli/main.py puts them together
with the library's).

    medvlm-fl simulate [--config PRESET] [--run-dir DIR | --name NAME] [key=value ...]
    medvlm-fl certs --host NAME_OR_IP [--host ...] --out DIR [--force]   (coordinator: CA + SuperLink TLS)
    medvlm-fl node-key --name HOSPITAL --out DIR                        (hospital: node-auth key pair)
    medvlm-fl superlink --certs DIR [--host H] [--port P] [--control-port C]   (coordinator: TLS + node auth;
                                                                         Control API on 127.0.0.1:C only)
    medvlm-fl supernode --superlink H:P --ca ca.crt --key KEY --hospital NAME --data-path M --state-dir D --epsilon E
    medvlm-fl ledger show|init|raise STATE_DIR                          (hospital: its privacy ledger)
    medvlm-fl audit [--config PRESET] [--canaries N] [--kind gradient|input] [--federated]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cli.library import accuracy_table
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
    if _stopped_short(summary):          # hospitals missing, or every one failed: not a result
        print(f"the federation {summary['stopped']}", file=sys.stderr)
        return 1
    return 0


def _stopped_short(s: dict) -> bool:
    """The run stopped before its rounds were done for want of hospitals (server.app's "stopped ..."),
    not at its end or because every budget was spent."""
    return s["stopped"].startswith("stopped")


def print_summary(s: dict) -> None:
    from rich.console import Console

    table = accuracy_table(f"federation -> {s['run_dir']} ({s['rounds']} rounds, {s['stopped']})", s,
                                       model_label="global model")
    console = Console()
    console.print(table)
    for name, p in s["privacy"].items():
        mechanisms = p.get("mechanisms") or [{"stage": None, **p}]
        console.print(f"{name}: epsilon {p['epsilon']:.2f} (budget {p.get('budget')}) at delta {p['delta']:g}; " + "; ".join(
            (f"{m['stage']}: " if len(mechanisms) > 1 else "") +
            f"sigma {m['noise_multiplier']:.3f}, q {m['sample_rate']:.4f}, {m['steps']} DP-SGD steps" for m in mechanisms))
    if s["rounds"] and not s.get("eval_questions") and not s.get("eval_reports") and not _stopped_short(s):
        console.print("[yellow]nothing was scored: the hospitals' validation splits hold no questions (each is "
                      "data.val_fraction of a hospital's images: give more images, or a larger data.val_fraction)")
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


def _superlink(args: argparse.Namespace) -> int:
    """The SuperLink on the coordinator's loopback (Control API for its own `flwr`), and the gateway on
    the public address (hospitals' Fleet API only): see server/gateway.py."""
    import os
    import shutil
    import signal
    import subprocess
    import threading

    from server.deploy import superlink_command
    from server.gateway import serve_gateway

    if args.control_port == args.port:
        raise ValueError(f"--control-port must differ from --port ({args.port}): the Control API is not public")
    cmd = superlink_command(certs=args.certs, host="127.0.0.1", port=args.control_port, database=args.database,
                            insecure=args.insecure)
    control = f"127.0.0.1:{args.control_port}"
    print(shlex.join(cmd), flush=True)
    print(f"gateway {args.host}:{args.port} -> Fleet API of {control}; Control API (flwr run, flwr supernode "
          f"register) only on {control}", flush=True)
    if args.dry_run:
        return 0
    if args.database:
        Path(args.database).parent.mkdir(parents=True, exist_ok=True)
    link = subprocess.Popen([shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0]), *cmd[1:]])

    def watch() -> None:    # the gateway stops with the SuperLink
        link.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    try:
        serve_gateway(host=args.host, port=args.port, upstream=("http" if args.insecure else "https") + f"://{control}",
                      control=control, certs=None if args.insecure else Path(args.certs))
    finally:
        if link.poll() is None:
            link.terminate()
            link.wait(timeout=30)
    return link.returncode or 0


def _supernode(args: argparse.Namespace) -> int:
    import tempfile

    from client.deploy import probe_superlink, run_supernode, supernode_command, task_command

    stage_data = {}
    for item in args.stage_data or []:
        stage, sep, path = item.partition("=")
        if not sep or not stage or not path:
            raise ValueError(f"--stage-data {item!r}: use STAGE=PATH, e.g. align=/data/reports")
        stage_data[stage] = path
    cmd = supernode_command(superlink=args.superlink, hospital=args.hospital, data_path=args.data_path,
                            data_format=args.data_format, on_bad_row=args.on_bad_row, state_dir=args.state_dir,
                            ca=args.ca, key=args.key,
                            port=args.port, device=args.device, epsilon=args.epsilon, delta=args.delta,
                            insecure=args.insecure, stage_data=stage_data, labeler=args.labeler, dp=not args.no_dp,
                            max_grad_norm=args.max_grad_norm, accountant=args.accountant, min_noise=args.min_noise,
                            evaluate=args.evaluate)
    with tempfile.TemporaryDirectory(prefix="medvlm-pin-") as pin_dir:
        task = task_command(cmd, hospital=args.hospital, pin_dir=Path(pin_dir), app_digest=args.app_digest,
                            sandbox=not args.no_sandbox, read=args.read or (), key=args.key)
        print(shlex.join(cmd), flush=True)
        print("each task: " + shlex.join(task) + " --token ...", flush=True)
        if args.dry_run:
            return 0
        found = probe_superlink(args.superlink, ca=args.ca, insecure=args.insecure)
        print(f"the SuperLink at {args.superlink} answers ({'TLS, verified by the CA' if found == 'tls' else 'without TLS'})",
              flush=True)
        return run_supernode(cmd, task)


def _ledger(args: argparse.Namespace) -> int:
    from client.ledger import LEDGER_FILE, Ledger, exclusive

    state = Path(args.state_dir)
    if args.action == "init":
        if args.epsilon is None or args.hospital is None:
            raise ValueError("ledger init needs --hospital and --epsilon")
        ledger, created = Ledger.init(state, hospital=args.hospital, budget=args.epsilon, delta=args.delta,
                                      accountant=args.accountant, max_grad_norm=args.max_grad_norm)
        print(f"{'created' if created else 'found'} {state / LEDGER_FILE}")
    path = state / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no privacy ledger in {state}")
    import contextlib
    import json

    if args.action == "raise" and args.epsilon is None:
        raise ValueError("ledger raise needs --epsilon (the new budget) and --reason")
    # raising: read and written back under the ledger's lock, so a round charged meanwhile is not written over
    with exclusive(state) if args.action == "raise" else contextlib.nullcontext():
        data = json.loads(path.read_text())
        ledger = Ledger.open(state, hospital=data["hospital"], budget=data["budget"], delta=data["delta"],
                             accountant=data["accountant"], max_grad_norm=data["max_grad_norm"], must_exist=True)
        if args.action == "raise":
            ledger.raise_budget(args.epsilon, reason=args.reason or "")
            ledger.save(state)
    print(f"{ledger.hospital}: epsilon {ledger.epsilon:.3f} spent of budget {ledger.budget:g} at delta "
          f"{ledger.delta:g} ({ledger.accountant}); rounds {ledger.rounds}; {ledger.total_steps} DP-SGD steps; "
          f"sigma {ledger.noise_multiplier}, q {ledger.sample_rate}")
    for change in ledger.budget_changes:
        print(f"  budget raised {change['from']:g} -> {change['to']:g} at {change['at']}: {change['reason']}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from medvlm.config import load_config
    from medvlm.runs import new_run_dir
    from simulations.audit import card, run_audit

    out = Path(args.out) if args.out else new_run_dir(load_config(args.config, list(args.overrides)).output_dir,
                                                      "audit")
    report = run_audit(args.config, list(args.overrides), out, canaries=args.canaries, federated=args.federated,
                       seed=args.seed, kind=args.kind)
    print(card(report))
    print(f"report, plot and card in {out / 'audit'}")
    return 0


def add_federation_commands(sub) -> None:
    """simulate, certs, node-key, superlink, supernode, audit, ledger."""
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
    p.add_argument("--port", type=int, default=9092, help="the public port hospitals' SuperNodes connect to")
    p.add_argument("--control-port", type=int, default=9093,
                   help="the SuperLink itself, on 127.0.0.1 only: the coordinator's `flwr run` / `flwr supernode` "
                        "connect here (default 9093)")
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
    p.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                   help="error: refuse to start while the data check rejects rows (default); skip: train "
                        "without them (each listed in the log; see medvlm-fl check-data)")
    p.add_argument("--state-dir", required=True, help="folder for the privacy ledger; must survive restarts")
    p.add_argument("--stage-data", action="append", metavar="STAGE=PATH",
                   help="another data folder for one curriculum stage (federation.stages), e.g. align=/data/reports")
    p.add_argument("--device", help="e.g. cuda:0 (default: the run config's train.device)")
    p.add_argument("--epsilon", type=float, help="this hospital's privacy budget at --delta (required with DP; the "
                                                 "coordinator can neither set nor raise it)")
    p.add_argument("--delta", type=float, default=1e-5, help="default 1e-5")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD clipping bound (default 1.0)")
    p.add_argument("--accountant", default="rdp", choices=["rdp", "prv", "gdp"], help="default rdp")
    p.add_argument("--min-noise", type=float, default=0.0, help="floor on the noise multiplier (default 0)")
    p.add_argument("--evaluate", default="counts", choices=["counts", "off"],
                   help="counts: score each global state the coordinator sends on the validation split and reply "
                        "exact correct/total counts (not DP; default); off: never score, reply why")
    p.add_argument("--no-dp", action="store_true", help="this hospital decides to train WITHOUT differential privacy")
    p.add_argument("--labeler", help="report finding labeler, package.module:function (default: synthetic); the "
                                     "run config's data.labeler is never used at a deployed site")
    p.add_argument("--app-digest", help="refuse to start unless the installed app has this digest (the one reviewed)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run the ClientApp without Landlock confinement (kernels without Landlock)")
    p.add_argument("--read", action="append", metavar="DIR",
                   help="another folder the ClientApp may read, e.g. local model directories (repeatable)")
    p.add_argument("--port", type=int, default=9094, help="local port for the ClientApp runtime (one per SuperNode "
                                                          "on a machine; not opened to the network)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (closed test networks)")
    p.add_argument("--dry-run", action="store_true", help="check and print the flower-supernode command only")
    p.set_defaults(func=_supernode)

    p = sub.add_parser("audit", help="empirical privacy audit: canaries, an epsilon lower bound next to the "
                                     "accountant's (DP on, noise far too low, DP off)")
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    p.add_argument("--canaries", type=int, default=2000,
                   help="canaries, each in the hospital's training with p = 1/2 (default 2000; more: a higher reach)")
    p.add_argument("--kind", default="gradient", choices=["gradient", "input"],
                   help="gradient: Dirac gradient canaries in the hospital's DP-SGD steps (default; measures the "
                        "mechanism); input: image-question canaries in its data (little power on tiny models)")
    p.add_argument("--federated", action="store_true", help="audit the federation's global model (canaries at the "
                                                             "first hospital), not that hospital's update")
    p.add_argument("--seed", type=int, default=0, help="which canaries are drawn in")
    p.add_argument("--out", help="folder for audit/ (default: a new run folder under output_dir)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. privacy.target_epsilon=4")
    p.set_defaults(func=_audit)

    p = sub.add_parser("ledger", help="hospital: show, set up, or deliberately raise the on-site privacy ledger")
    p.add_argument("action", choices=["show", "init", "raise"])
    p.add_argument("state_dir", help="the hospital's state dir")
    p.add_argument("--hospital", help="init: the hospital's name")
    p.add_argument("--epsilon", type=float, help="init: the budget; raise: the new budget")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="rdp", choices=["rdp", "prv", "gdp"])
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--reason", help="raise: why (kept in the ledger)")
    p.set_defaults(func=_ledger)

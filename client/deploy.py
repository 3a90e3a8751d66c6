"""Start a hospital's SuperNode the secure way, after checking everything it will need.

``medvlm-fl supernode --superlink coordinator:9092 --ca ca.crt --key keys/st-mary --hospital st-mary
--data-path /data/vqa/manifest.jsonl --state-dir /var/lib/medvlm --epsilon 8`` checks that the CA
certificate, the private key, the data (every row, every image), a writable state directory and the
hospital's privacy policy are there, sets up the privacy ledger, pins the installed app, then starts
``flower-supernode`` with TLS, node authentication, ``--isolation process`` and a correctly quoted
``--node-config``, and serves its tasks with the installed, sandboxed ClientApp (``client/pinned.py``).
The SuperNode only dials out: the hospital opens no inbound port.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("medvlm.client")

INSECURE_WARNING = ("INSECURE: this SuperNode talks to the SuperLink without TLS and without authenticating; "
                    "model updates travel in clear text. Use this only on a closed test network.")


def node_config_string(values: dict[str, object]) -> str:
    """Flower's ``--node-config`` syntax: strings quoted, numbers bare."""
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str):
            if '"' in value:
                raise ValueError(f"node config {key}={value!r}: a value may not contain a double quote")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def check_site(*, data_path: str | Path, state_dir: str | Path, data_format: str = "auto",
               on_bad_row: str = "error") -> int:
    """Fail before connecting if the data or the ledger folder is unusable; returns the row count.
    ``on_bad_row="skip"``: the site trains without the bad rows (each listed in the log)."""
    from medvlm.data.manifest import read_manifest

    manifest = read_manifest(data_path, fmt=data_format, on_bad_row=on_bad_row)   # names every bad row
    for reason, n in manifest.left_out.items():
        log.info("%s: %d row(s) left out: %s", data_path, n, reason)
    state = Path(state_dir)
    if state.exists() and not state.is_dir():
        raise NotADirectoryError(f"state-dir {state} is a file: give a folder (the privacy ledger, kept updates and "
                                 "feature cache live there)")
    state.mkdir(parents=True, exist_ok=True)
    if not os.access(state, os.W_OK):
        raise PermissionError(f"state-dir {state} is not writable: the privacy ledger must persist there")
    return len(manifest.rows)


def site_policy(*, dp: bool = True, epsilon: Optional[float], delta: float = 1e-5, max_grad_norm: float = 1.0,
                accountant: str = "rdp", min_noise: float = 0.0, evaluate: str = "counts") -> dict[str, object]:
    """The hospital's privacy policy as node-config keys (validated: a SuperNode without a budget is
    refused here, before it connects)."""
    from client.policy import SitePolicy

    if dp and epsilon is None:
        raise ValueError("a hospital sets its own privacy budget: pass --epsilon (e.g. --epsilon 8); the "
                         "coordinator's run config cannot set or raise it. (--no-dp only if this hospital "
                         "decides to train without differential privacy.)")
    SitePolicy(dp=dp, epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm, accountant=accountant,
               min_noise=min_noise, evaluate=evaluate, source="medvlm-fl supernode")
    return {"dp": "on" if dp else "off", "epsilon": epsilon, "delta": delta, "max-grad-norm": max_grad_norm,
            "accountant": accountant, "min-noise": min_noise or None,
            "evaluate": None if evaluate == "counts" else evaluate}


def supernode_command(*, superlink: str, hospital: str, data_path: str | Path, state_dir: str | Path,
                      data_format: str = "auto", on_bad_row: str = "error",
                      ca: Optional[str | Path], key: Optional[str | Path], port: int,
                      device: Optional[str] = None, epsilon: Optional[float] = None,
                      delta: float = 1e-5, insecure: bool = False,
                      stage_data: Optional[dict[str, str]] = None, labeler: Optional[str] = None,
                      **policy: object) -> list[str]:
    """Check the site, set up its ledger, and return the ``flower-supernode`` command (process
    isolation: the site's launcher serves its tasks with the installed app)."""
    from client.ledger import Ledger
    from medvlm.wire import check_hospital_name

    check_hospital_name(hospital)           # it names the site in the coordinator's reports and logs
    node_policy = site_policy(epsilon=epsilon, delta=delta, **policy)   # refuses a missing budget first
    cmd = ["flower-supernode", "--superlink", superlink]
    if insecure:
        if ca or key:
            raise ValueError("--insecure contradicts --ca/--key: drop one")
        log.warning("%s", INSECURE_WARNING)
        cmd.append("--insecure")
    else:
        if not ca or not key:
            raise ValueError("a SuperNode needs the consortium's CA certificate (--ca ca.crt) and this hospital's "
                             "private key (--key, made by `medvlm-fl node-key`); --insecure only on a test network")
        for what, path in (("CA certificate", ca), ("private key", key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{what} {path} not found")
        _check_private_key(Path(key))
        cmd += ["--root-certificates", str(Path(ca).resolve()), "--auth-supernode-private-key",
                str(Path(key).resolve())]
    rows = check_site(data_path=data_path, state_dir=state_dir, data_format=data_format, on_bad_row=on_bad_row)
    log.info("hospital %s: %d data rows in %s; ledger in %s", hospital, rows, data_path, state_dir)
    for stage, path in (stage_data or {}).items():   # another folder for one curriculum stage
        rows = check_site(data_path=path, state_dir=state_dir, data_format=data_format, on_bad_row=on_bad_row)
        log.info("hospital %s, stage %s: %d data rows in %s", hospital, stage, rows, path)
    if node_policy["dp"] == "on":
        ledger, created = Ledger.init(state_dir, hospital=hospital, budget=float(epsilon), delta=float(delta),
                                      accountant=str(node_policy["accountant"]),
                                      max_grad_norm=float(node_policy["max-grad-norm"]))
        log.info("hospital %s: privacy ledger %s (epsilon %.2f spent of %g)", hospital,
                 "created" if created else "found", ledger.epsilon, ledger.budget)
    else:
        log.warning("hospital %s trains WITHOUT differential privacy (--no-dp): its updates are not DP", hospital)
    node_config = node_config_string({"hospital": hospital, "data-path": str(Path(data_path).resolve()),
                                      "data-format": None if data_format == "auto" else data_format,
                                      "on-bad-row": None if on_bad_row == "error" else on_bad_row,
                                      "state-dir": str(Path(state_dir).resolve()), "device": device,
                                      "labeler": labeler, **node_policy,
                                      **{f"data-path-{stage}": str(Path(path).resolve())
                                         for stage, path in (stage_data or {}).items()}})
    return cmd + ["--node-config", node_config, "--isolation", "process", "--port", str(port)]


def task_command(cmd: Sequence[str], *, hospital: str, pin_dir: Path, app_digest: Optional[str] = None,
                 sandbox: bool = True, read: Sequence[str] = (), key: Optional[str | Path] = None) -> list[str]:
    """Pin the installed app and return the command that serves one task with it (``--token`` follows).
    Refuses when the installation differs from a digest the hospital reviewed (``app_digest``), or when
    the sandbox would leave the node's private key readable."""
    import json

    from flwr.common.config import parse_config_args

    from client import pinned
    from client.sandbox import abi_version, covering

    files = pinned.installed_files()
    ours = pinned.digest(files)
    if app_digest and app_digest != ours:
        raise ValueError(f"the installed app's digest is {ours}, not the {app_digest} this site pinned "
                         "(--app-digest): its code changed since it was reviewed; reinstall the reviewed version")
    pin = pinned.write_pin(pin_dir, files)
    log.info("hospital %s runs only the installed app, digest %s (%d code files)", hospital, ours, len(files))
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    box = "off"
    if sandbox:
        if abi_version() < 1:
            raise ValueError("this kernel has no Landlock, so the ClientApp cannot be confined to the data "
                                     "and state folders; run on Linux >= 5.13, or pass --no-sandbox (the ClientApp "
                                     "is still only the installed code; then keep the node key unreadable to this "
                                     "user)")
        readable, writable = pinned.sandbox_paths(node_config, extra_read=read)
        if key is not None and (root := covering(key, readable + writable)):
            raise ValueError(f"the node's private key {key} lies inside {root}, which the ClientApp may read: "
                             "keep it in a folder of its own (outside the data, state, model and code folders)")
        box = json.dumps({"read": readable, "write": writable})
    else:
        log.warning("hospital %s: the ClientApp runs without a sandbox (--no-sandbox)", hospital)
    runtime = f"127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    return [sys.executable, "-m", "client.pinned", "--runtime-api-address", runtime, "--pin", str(pin),
            "--digest", ours, "--hospital", hospital, "--sandbox", box]


def probe_superlink(address: str, *, ca: Optional[str | Path] = None, insecure: bool = False,
                    timeout: float = 10.0) -> str:
    """Check, before the SuperNode starts retrying for ever, that the SuperLink answers at ``address`` the
    way this site is set up: TLS verified by ``ca``, or plain (``insecure``). Raises with one line saying
    what to fix; returns what was found."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"--superlink {address!r}: use HOST:PORT, e.g. coordinator.example.org:9092")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as err:
        raise ConnectionError(f"cannot reach the SuperLink at {address} ({err.strerror or err}): check the host, "
                              "the port (the coordinator's public port, 9092 by default) and the firewall") from None
    verify = ssl.create_default_context(cafile=str(ca)) if ca and not insecure else ssl._create_unverified_context()
    with sock:
        try:
            verify.wrap_socket(sock, server_hostname=host).close()   # the handshake is the check
        except ssl.SSLCertVerificationError as err:
            raise ValueError(f"the SuperLink at {address} presents a certificate that {ca} does not accept "
                             f"({err.verify_message}): use the consortium's ca.crt from the coordinator, and the host "
                             "name its certificate was made for (medvlm-fl certs --host)") from None
        except (ssl.SSLError, OSError):
            if insecure:
                return "plain"
            raise ValueError(f"the SuperLink at {address} does not speak TLS (started --insecure?): ask the "
                             "coordinator for its TLS address, or start this SuperNode with --insecure on a test "
                             "network only") from None
    if insecure:
        raise ValueError(f"the SuperLink at {address} speaks TLS, but this SuperNode was started with --insecure: "
                         "pass --ca ca.crt --key <this hospital's node key> instead")
    return "tls"


def run_supernode(cmd: Sequence[str], task_argv: Sequence[str]) -> int:
    """Start ``flower-supernode`` and serve its tasks with ``task_argv`` until it exits (its exit code)."""
    import shutil
    import signal
    import subprocess

    from client.pinned import serve

    binary = shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0])
    supernode = subprocess.Popen([binary, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
    seen: list[str] = []
    echo = threading.Thread(target=_echo, args=(supernode.stdout, seen), daemon=True)
    echo.start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}

    def stop(signum, _frame):
        supernode.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        code = serve(runtime_address=task_argv[task_argv.index("--runtime-api-address") + 1], supernode=supernode,
                     task_argv=task_argv, env=env)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            supernode.wait(timeout=30)
    echo.join(timeout=5)
    reason = explain_exit(seen, cmd)
    if reason and code:
        log.error("%s", reason)
        print(f"medvlm-fl supernode: {reason}", file=sys.stderr, flush=True)
    return code


# What Flower's SuperNode prints when the SuperLink refuses it, and what the hospital must do.
UNREGISTERED_MARKERS = ("Failed to activate SuperNode", "All SuperNodes must be registered via the CLI")


def _echo(stream, seen: list[str]) -> None:
    """Pass the SuperNode's output through unchanged, keeping the lines that explain a refusal."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        if any(marker in line for marker in UNREGISTERED_MARKERS):
            seen.append(line.strip())


def explain_exit(lines: Sequence[str], cmd: Sequence[str]) -> Optional[str]:
    """One line saying why the SuperLink refused this node and what to do, from the lines ``_echo`` kept."""
    if not any(marker in line for line in lines for marker in UNREGISTERED_MARKERS):
        return None
    key = cmd[cmd.index("--auth-supernode-private-key") + 1] if "--auth-supernode-private-key" in cmd else None
    public = f"{key}.pub" if key else "this node's public key"
    return (f"the SuperLink refused to activate this node: {public} is not registered in this consortium. "
            f"Send {public} to the coordinator, who registers it with `flwr supernode register {public} "
            "<federation>`; then start this SuperNode again")


def _check_private_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({err}); make one with "
                         "`medvlm-fl node-key --name <hospital>`") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: Flower's node authentication needs an ECDSA key, not {type(key).__name__}")

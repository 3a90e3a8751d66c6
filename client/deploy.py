"""Start a hospital's SuperNode the secure way, after checking everything it will need.

``medvlm-fl supernode --superlink coordinator:9092 --ca ca.crt --key keys/st-mary
--hospital st-mary --data-path /data/vqa/manifest.jsonl --state-dir /var/lib/medvlm`` checks that
the CA certificate, the private key, the data manifest (every row, every image) and a writable
state directory are there, then runs (and prints) ``flower-supernode`` with TLS, node
authentication and a correctly quoted ``--node-config``. The SuperNode only dials out: the
hospital opens no inbound port.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

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


def check_site(*, data_path: str | Path, state_dir: str | Path, data_format: str = "auto") -> int:
    """Fail before connecting if the data or the ledger folder is unusable; returns the row count."""
    from medvlm.data.manifest import read_manifest

    manifest = read_manifest(data_path, fmt=data_format)   # names every bad row and refuses to start
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if not os.access(state, os.W_OK):
        raise PermissionError(f"state-dir {state} is not writable: the privacy ledger must persist there")
    return len(manifest.rows)


def supernode_command(*, superlink: str, hospital: str, data_path: str | Path, state_dir: str | Path,
                      data_format: str = "auto",
                      ca: Optional[str | Path], key: Optional[str | Path], port: int,
                      device: Optional[str] = None, epsilon: Optional[float] = None,
                      delta: Optional[float] = None, insecure: bool = False,
                      stage_data: Optional[dict[str, str]] = None) -> list[str]:
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
    rows = check_site(data_path=data_path, state_dir=state_dir, data_format=data_format)
    log.info("hospital %s: %d data rows in %s; ledger in %s", hospital, rows, data_path, state_dir)
    for stage, path in (stage_data or {}).items():   # another folder for one curriculum stage
        rows = check_site(data_path=path, state_dir=state_dir, data_format=data_format)
        log.info("hospital %s, stage %s: %d data rows in %s", hospital, stage, rows, path)
    node_config = node_config_string({"hospital": hospital, "data-path": str(Path(data_path).resolve()),
                                      "data-format": None if data_format == "auto" else data_format,
                                      "state-dir": str(Path(state_dir).resolve()), "device": device,
                                      "epsilon": epsilon, "delta": delta,
                                      **{f"data-path-{stage}": str(Path(path).resolve())
                                         for stage, path in (stage_data or {}).items()}})
    return cmd + ["--node-config", node_config, "--port", str(port)]


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

"""Start the coordinator's SuperLink the secure way: TLS and node authentication unless the
operator explicitly asks for neither (``--insecure``, with a warning).

``medvlm-fl superlink --certs certs/ --port 9092`` runs (and prints)::

    flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem
        --ssl-keyfile certs/server.key --enable-supernode-auth
        --disable-runtime-dependency-installation --database state/superlink.db --host ... --port ...

Runtime dependency installation stays off: hospitals and coordinators run offline, and the
federation must use the pinned, tested environment, not whatever ``uv sync`` resolves today.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("medvlm.server")

INSECURE_WARNING = ("INSECURE: the SuperLink runs without TLS and without node authentication; model updates "
                    "travel in clear text and any machine that can reach the port can join as a hospital. "
                    "Use this only on a closed test network.")


def superlink_command(*, certs: Optional[str | Path], host: str, port: int, database: Optional[str | Path],
                      insecure: bool = False) -> list[str]:
    """The ``flower-superlink`` command line; refuses a secure start with missing files."""
    cmd = ["flower-superlink"]
    if insecure:
        if certs:
            raise ValueError("--insecure and --certs contradict each other: drop one")
        log.warning("%s", INSECURE_WARNING)
        cmd.append("--insecure")
    else:
        if not certs:
            raise ValueError("the SuperLink needs TLS: pass --certs DIR (made by `medvlm-fl certs --host NAME`), "
                             "or --insecure on a closed test network")
        folder = Path(certs)
        files = {"--ssl-ca-certfile": folder / "ca.crt", "--ssl-certfile": folder / "server.pem",
                 "--ssl-keyfile": folder / "server.key"}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)}: create them with "
                                    f"`medvlm-fl certs --host <name-or-ip> --out {folder}`")
        for flag, path in files.items():
            cmd += [flag, str(path.resolve())]
        cmd.append("--enable-supernode-auth")   # only registered hospital keys may connect
    cmd.append("--disable-runtime-dependency-installation")
    if database:
        cmd += ["--database", str(Path(database).resolve())]   # registrations and runs survive a restart
    return cmd + ["--host", host, "--port", str(port)]

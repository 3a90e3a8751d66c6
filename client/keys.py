"""A hospital's node-authentication key pair (what ``ssh-keygen -t ecdsa -b 384`` makes).

``medvlm-fl node-key --name st-mary --out keys/`` writes

    st-mary       the private key (OpenSSH format, mode 0600): never leaves the hospital;
                  ``flower-supernode --auth-supernode-private-key keys/st-mary``
    st-mary.pub   the public key: send it to the coordinator, who registers it with
                  ``flwr supernode register keys/st-mary.pub <connection> --name st-mary``

The SuperLink (``--enable-supernode-auth``) refuses any SuperNode whose key is not registered.
An existing key is never overwritten: losing it means re-registering the hospital.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medvlm.wire import check_hospital_name



def create_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Create ``<out>/<name>`` (private) and ``<out>/<name>.pub``; refuse to overwrite either."""
    check_hospital_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / name, out / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: a hospital keeps its key (the coordinator registered it); "
                                  "delete it yourself only if you mean to register a new one")
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public

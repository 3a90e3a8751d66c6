"""The coordinator's TLS material: a consortium CA and the SuperLink's server certificate.

``medvlm-fl certs --host coordinator.example.org --host 10.0.0.5 --out certs/`` writes

    ca.crt       the CA certificate: every hospital gets a copy (``--root-certificates``)
    ca.key       the CA's private key (mode 0600): stays with the coordinator, offline if possible
    server.pem   the SuperLink's certificate, valid for exactly the given names/IPs (SAN)
    server.key   its private key (mode 0600)

An existing CA is reused (hospitals keep trusting it), so re-issuing the server certificate for a
new address needs no new ``ca.crt`` at the sites; an existing server certificate is only replaced
with ``force``. Keys are ECDSA P-384, as Flower's node authentication uses for hospitals.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medvlm.files import write_bytes

CA_DAYS, SERVER_DAYS = 3650, 825   # 825 days: the longest server lifetime TLS clients accept


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca_created: bool


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses the SuperLink is reached at (TLS clients check the SAN only)."""
    if not hosts:
        raise ValueError("give at least one --host: the name or IP address hospitals use to reach the SuperLink")
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        names.append(x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(_dns_name(host)))
    return names


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _dns_name(host: str) -> str:
    """``host`` as the ASCII DNS name a certificate carries (an internationalised name in its IDNA form), or a
    ValueError saying what is wrong: a TLS client would never match the certificate to the address it dials."""
    bad = f"--host {host!r} is not a host name or IP address"
    if not host or any(c in host for c in " /:@"):
        raise ValueError(f"{bad} (give the bare name or address: no scheme, port or path)")
    try:
        ascii_name = host.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError as err:
        raise ValueError(f"{bad} ({err})") from None
    if len(ascii_name) > 253:
        raise ValueError(f"{bad}: {len(ascii_name)} characters, DNS allows 253")
    labels = ascii_name.split(".")
    if wrong := [label for label in labels if not _LABEL.fullmatch(label)]:
        raise ValueError(f"{bad}: {wrong[0]!r} is not a DNS label (letters, digits and inner hyphens, 1-63 of them)")
    if labels[-1].isdigit():
        raise ValueError(f"{bad}: it reads as an IPv4 address, but not a valid one")
    return ascii_name


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medvlm-fl consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{cert_path} / {key_path}: not a readable CA certificate and unencrypted key ({err}); "
                         "move them away to create a new CA (hospitals then need the new ca.crt)") from err
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def create_certificates(out_dir: str | Path, hosts: Sequence[str], *, force: bool = False,
                        now: dt.datetime | None = None) -> CertPaths:
    """Create (or reuse) the CA and issue the SuperLink certificate for ``hosts``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", ca_created=False)
    sans = subject_alt_names(hosts)
    if paths.server_cert.exists() and not force:
        raise FileExistsError(f"{paths.server_cert} exists; pass --force to issue a new SuperLink certificate "
                              "(the CA is kept, so hospitals need nothing new)")
    now = now or dt.datetime.now(dt.timezone.utc)
    if paths.ca_cert.exists() != paths.ca_key.exists():
        raise FileNotFoundError(f"found only one of {paths.ca_cert} and {paths.ca_key}: restore the other, or move "
                                "both away to create a new CA")
    if paths.ca_cert.exists():
        ca_cert, ca_key = _load_ca(paths.ca_cert, paths.ca_key)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = _name("medvlm-fl consortium CA")
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
        _write_private(paths.ca_key, ca_key)
        _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        paths = replace(paths, ca_created=True)

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(paths.server_key, key)
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths

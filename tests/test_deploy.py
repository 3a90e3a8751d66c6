"""Deployment tooling: the coordinator's CA + SuperLink certificate, hospitals' node keys, and the
secure-by-default SuperLink/SuperNode command lines (the real processes run in test_deploy_e2e)."""

import json
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from client.deploy import node_config_string, supernode_command
from client.ledger import LEDGER_FILE
from client.keys import create_node_key
from medvlm.data.synthetic import generate_hospital, write_manifest
from server.certs import create_certificates
from server.deploy import superlink_command

ROOT = Path(__file__).resolve().parents[1]


def test_certificates_chain_to_the_ca_and_name_the_superlink(tmp_path):
    paths = create_certificates(tmp_path, ["127.0.0.1", "coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)                            # raises if not signed by the CA
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths.ca_key, paths.server_key):                    # private keys: owner only
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    with pytest.raises(FileExistsError, match="--force"):            # nothing is overwritten by accident
        create_certificates(tmp_path, ["127.0.0.1"])
    again = create_certificates(tmp_path, ["10.0.0.5"], force=True)  # new address, same CA
    assert not again.ca_created and again.ca_cert.read_bytes() == paths.ca_cert.read_bytes()
    x509.load_pem_x509_certificate(again.server_cert.read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(ValueError, match="host name or IP"):
        create_certificates(tmp_path / "other", ["https://coordinator:9092"])


def test_a_host_no_tls_client_could_match_is_refused_before_any_key_is_made(tmp_path):
    """The certificate names exactly what hospitals dial; a name no resolver or TLS client accepts (an IPv4
    address out of range, a label with '!', an underscore or a leading hyphen) would fail at every site's
    handshake, so it is refused saying why; an internationalised name is written in its IDNA form."""
    for host, why in (("256.1.1.1", "IPv4"), ("coord!nator.org", "DNS label"), ("-coord.org", "DNS label"),
                      ("coord_1.org", "DNS label"), ("a..b", "host name"), ("x" * 64 + ".org", "host name"),
                      ("user@coord.org", "no scheme")):
        with pytest.raises(ValueError, match=why):
            create_certificates(tmp_path / "refused", [host])
        assert not (tmp_path / "refused" / "ca.key").exists()
    paths = create_certificates(tmp_path / "idn", ["krankenhaus-münchen.de", "coord.example.org.", "::1"])
    san = x509.load_pem_x509_certificate(paths.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--krankenhaus-mnchen-y6b.de", "coord.example.org"]


def test_node_keys_are_what_flower_node_authentication_loads(tmp_path):
    private, public = create_node_key(tmp_path, "st-mary")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="keeps its key"):
        create_node_key(tmp_path, "st-mary")
    with pytest.raises(ValueError, match="hospital name"):
        create_node_key(tmp_path, "../evil")


def test_superlink_is_secure_unless_asked_and_warns_when_it_is_not(tmp_path, caplog):
    with pytest.raises(ValueError, match="needs TLS"):
        superlink_command(certs=None, host="0.0.0.0", port=9092, database=None)
    with pytest.raises(FileNotFoundError, match="medvlm-fl certs"):
        superlink_command(certs=tmp_path, host="0.0.0.0", port=9092, database=None)
    create_certificates(tmp_path, ["127.0.0.1"])
    cmd = superlink_command(certs=tmp_path, host="0.0.0.0", port=9092, database=tmp_path / "db" / "s.db")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in cmd
    assert "--insecure" not in cmd
    with caplog.at_level(logging.WARNING):
        insecure = superlink_command(certs=None, host="127.0.0.1", port=9092, database=None, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "INSECURE" in caplog.text


def test_supernode_checks_the_site_before_it_connects(tmp_path, caplog):
    create_certificates(tmp_path / "certs", ["127.0.0.1"])
    private, _ = create_node_key(tmp_path / "keys", "st-mary")
    manifest = write_manifest(generate_hospital("general", 6, seed=0), tmp_path / "data")
    common = dict(superlink="127.0.0.1:9092", hospital="st-mary", data_path=manifest, state_dir=tmp_path / "state",
                  ca=tmp_path / "certs" / "ca.crt", port=9094)
    cmd = supernode_command(key=private, epsilon=4.0, **common)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(private.resolve())
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])   # Flower's own parser
    assert node_config == {"hospital": "st-mary", "data-path": str(manifest.resolve()),
                           "state-dir": str((tmp_path / "state").resolve()), "epsilon": 4.0, "dp": "on",
                           "delta": 1e-5, "max-grad-norm": 1.0, "accountant": "rdp"}   # the site's own policy
    assert cmd[cmd.index("--isolation") + 1] == "process"            # the site serves its tasks itself
    assert json.loads((tmp_path / "state" / LEDGER_FILE).read_text())["budget"] == 4.0   # ledger set up
    common["epsilon"] = 4.0
    named = supernode_command(key=private, data_format="jsonl", **{**common, "data_path": manifest.parent})
    assert parse_config_args([named[named.index("--node-config") + 1]])["data-format"] == "jsonl"
    quiet = supernode_command(key=private, evaluate="off", **common)       # scores no coordinator-sent state
    assert parse_config_args([quiet[quiet.index("--node-config") + 1]])["evaluate"] == "off"
    staged = supernode_command(key=private, stage_data={"align": str(manifest.parent)}, **common)
    assert parse_config_args([staged[staged.index("--node-config") + 1]])["data-path-align"] == \
        str(manifest.parent.resolve())                                # a curriculum stage's own folder
    with pytest.raises(FileNotFoundError):
        supernode_command(key=private, stage_data={"align": str(tmp_path / "missing")}, **common)
    with pytest.raises(ValueError, match="not a slake folder"):        # the wrong format, before connecting
        supernode_command(key=private, data_format="slake", **{**common, "data_path": manifest.parent})

    with pytest.raises(ValueError, match="--epsilon"):                 # no budget, no SuperNode
        supernode_command(key=private, **{**common, "epsilon": None})
    with pytest.raises(ValueError, match="hospital name 'st mary.*use letters, digits"):   # it names the site in
        supernode_command(key=private, **{**common, "hospital": "st mary\nround 9"})   # the coordinator's logs
    with pytest.raises(ValueError, match="never raised"):              # the ledger keeps its budget
        supernode_command(key=private, **{**common, "epsilon": 50.0})
    (tmp_path / "state" / LEDGER_FILE).unlink()                         # a lost ledger in a used state dir
    (tmp_path / "state" / "features").mkdir()
    with pytest.raises(ValueError, match="no privacy ledger"):
        supernode_command(key=private, **common)
    with pytest.raises(ValueError, match="OpenSSH private key"):       # the .pub file by mistake
        supernode_command(key=private.with_suffix(".pub"), **common)
    with pytest.raises(ValueError, match="CA certificate"):
        supernode_command(key=None, **{**common, "ca": None})
    (tmp_path / "state.txt").write_text("notes")
    with pytest.raises(NotADirectoryError, match="state-dir .*state.txt is a file: give a folder"):   # was Errno 17
        supernode_command(key=private, **{**common, "state_dir": tmp_path / "state.txt"})
    common["state_dir"] = tmp_path / "state2"
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace('"question": "', '"question": "  ').replace('"answer_type": "closed"',
                                                                             '"answer_type": "maybe"')
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="manifest.jsonl:3"):          # the bad row, by line
        supernode_command(key=private, **common)
    with pytest.raises(ValueError, match="double quote"):
        node_config_string({"hospital": 'a"b'})


def test_the_launchers_dry_runs_and_the_ledger_command(tmp_path, capsys, caplog):
    from cli.main import main

    create_certificates(tmp_path / "certs", ["127.0.0.1"])
    private, _ = create_node_key(tmp_path / "keys", "st-mary")
    manifest = write_manifest(generate_hospital("general", 4, seed=0), tmp_path / "data")
    state = tmp_path / "state"
    assert main(["superlink", "--certs", str(tmp_path / "certs"), "--port", "9092", "--control-port", "9093",
                 "--database", str(tmp_path / "db" / "s.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1 --port 9093" in out and "Control API (flwr run, flwr supernode register) only on" in out
    assert main(["superlink", "--certs", str(tmp_path / "certs"), "--port", "9092", "--control-port", "9092",
                 "--dry-run"]) == 2 and "must differ" in caplog.text
    args = ["supernode", "--superlink", "127.0.0.1:9092", "--ca", str(tmp_path / "certs" / "ca.crt"), "--key",
            str(private), "--hospital", "st-mary", "--data-path", str(manifest), "--state-dir", str(state),
            "--epsilon", "3", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--isolation process" in out and "each task: " in out and "-m client.pinned" in out
    assert '"write": ["' + str(state.resolve()) in out                    # the sandbox writes only there (+ cache)
    inside = tmp_path / "data" / "keys"                                     # a key the ClientApp could read
    create_node_key(inside, "st-mary")
    assert main([*args[:5], "--key", str(inside / "st-mary"), *args[7:]]) == 2
    assert "lies inside" in caplog.text

    assert main(["ledger", "show", str(state)]) == 0
    assert "epsilon 0.000 spent of budget 3" in capsys.readouterr().out
    assert main(["ledger", "raise", str(state), "--epsilon", "5"]) == 2 and "needs a reason" in caplog.text
    assert main(["ledger", "raise", str(state), "--epsilon", "5", "--reason", "ethics board"]) == 0
    assert "budget raised 3 -> 5" in capsys.readouterr().out
    assert json.loads((state / LEDGER_FILE).read_text())["budget"] == 5


def _serve(tls_ctx=None):
    """A one-port server on 127.0.0.1 that completes TLS handshakes with ``tls_ctx`` (or speaks plain TCP)."""
    import contextlib
    import socket
    import ssl
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                if tls_ctx is not None:
                    with contextlib.suppress(ssl.SSLError, OSError):   # a refused handshake is the point
                        tls_ctx.wrap_socket(conn, server_side=True).close()
                else:
                    conn.recv(1024)   # a plain server reads a TLS hello as garbage and hangs up

    threading.Thread(target=loop, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def test_a_supernode_set_up_wrongly_is_refused_at_start_with_what_to_fix(tmp_path):
    import ssl

    from client.deploy import probe_superlink

    paths = create_certificates(tmp_path / "good", ["127.0.0.1"])
    other = create_certificates(tmp_path / "other", ["127.0.0.1"])      # another consortium's CA
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    tls, tls_addr = _serve(ctx)
    plain, plain_addr = _serve()
    try:
        assert probe_superlink(tls_addr, ca=paths.ca_cert) == "tls"
        with pytest.raises(ValueError, match="speaks TLS, but this SuperNode was started with --insecure"):
            probe_superlink(tls_addr, insecure=True)
        with pytest.raises(ValueError, match="does not accept"):
            probe_superlink(tls_addr, ca=other.ca_cert)
        with pytest.raises(ValueError, match="does not speak TLS"):
            probe_superlink(plain_addr, ca=paths.ca_cert, timeout=3)
        assert probe_superlink(plain_addr, insecure=True, timeout=3) == "plain"
    finally:
        tls.close()
        plain.close()
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"                  # bound, never listening
        with pytest.raises(ConnectionError, match="cannot reach the SuperLink"):
            probe_superlink(closed, ca=paths.ca_cert, timeout=2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        probe_superlink("coordinator", ca=paths.ca_cert)


def test_an_unregistered_node_is_told_what_to_do_in_one_line():
    from client.deploy import explain_exit

    cmd = ["flower-supernode", "--superlink", "link:9092", "--auth-supernode-private-key", "/srv/keys/hospital-a"]
    flower = ["INFO :      Starting Flower SuperNode", "ERROR :     Failed to activate SuperNode."]
    reason = explain_exit(flower, cmd)
    assert "/srv/keys/hospital-a.pub is not registered" in reason
    assert "flwr supernode register /srv/keys/hospital-a.pub" in reason and "\n" not in reason
    assert explain_exit(["INFO :      Starting Flower SuperNode", "Connection attempt failed, retrying"], cmd) is None


def test_the_supernode_command_exits_at_once_on_a_tls_mismatch_or_a_wrong_ca(tmp_path):
    """The real command, as a process (the fault of issue 18: it retried for ever, saying nothing)."""
    import ssl
    import subprocess
    import sys

    from simulations.relay import free_port

    manifest = write_manifest(generate_hospital("general", 6, seed=0), tmp_path / "data")
    paths = create_certificates(tmp_path / "good", ["127.0.0.1"])
    other = create_certificates(tmp_path / "other", ["127.0.0.1"])
    key, _ = create_node_key(tmp_path / "keys", "hospital-a")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    tls, tls_addr = _serve(ctx)
    common = ["--hospital", "hospital-a", "--data-path", str(manifest), "--state-dir", str(tmp_path / "state"),
              "--epsilon", "8", "--port", str(free_port())]
    try:
        for flags, says in ((["--insecure"], "speaks TLS, but this SuperNode was started with --insecure"),
                            (["--ca", str(other.ca_cert), "--key", str(key)], "does not accept")):
            out = subprocess.run([sys.executable, "-m", "cli.main", "supernode", "--superlink", tls_addr,
                                  *flags, *common], capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert out.returncode != 0 and says in out.stderr, out.stderr[-2000:]
    finally:
        tls.close()

"""Only pinned code runs on site: a run's app bundle (FAB) is compared file by file with the app the
hospital installed, and the ClientApp process is confined by Landlock (the node key unreadable, only
the state dir writable, only the SuperNode's port reachable). Real processes: test_deploy_e2e.py."""

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client import pinned
from client.sandbox import abi_version
from server.gateway import create_gateway

ROOT = Path(__file__).resolve().parents[1]


def _project(folder: Path) -> Path:
    """A copy of the app's code as `flwr run` would bundle it (no venv, caches or runs)."""
    shutil.copytree(ROOT, folder, ignore=shutil.ignore_patterns(".venv", ".cache", "runs", ".git", "__pycache__",
                                                                "*.egg-info", ".pytest_cache"))
    return folder


def test_a_changed_app_is_refused_file_by_file(tmp_path):
    ours = pinned.installed_files(_project(tmp_path / "site"))
    assert "client/app.py" in ours and "configs/tiny.yaml" in ours and not any(p.endswith(".md") for p in ours)
    pinned.check_fab(build_fab_from_disk(tmp_path / "site"), ours, hospital="st-mary")     # the same app runs

    evil = _project(tmp_path / "evil")
    app = evil / "client" / "app.py"
    app.write_text(app.read_text() + "\nLEAK = open('/data/images/00000.png', 'rb').read()\n")
    (evil / "client" / "extra.py").write_text("print('hello')\n")
    (evil / "README.md").write_text("docs may differ\n")                  # not code: not compared
    with pytest.raises(pinned.AppRefused) as refused:
        pinned.check_fab(build_fab_from_disk(evil), ours, hospital="st-mary")
    message = str(refused.value)
    assert "refused by st-mary" in message and "client/app.py (changed)" in message
    assert "client/extra.py (not in this site's app)" in message and "README" not in message

    pin = pinned.write_pin(tmp_path / "pin", ours)
    assert pinned.read_pin(pin, pinned.digest(ours)) == ours
    data = json.loads(pin.read_text())
    data["files"]["client/app.py"] = "0" * 64                              # a pin rewritten behind our back
    pin.write_text(json.dumps(data))
    with pytest.raises(pinned.AppRefused, match="does not match"):
        pinned.read_pin(pin, pinned.digest(ours))


def test_the_clientapp_sandbox_keeps_the_key_and_the_network_out(tmp_path):
    if abi_version() < 4:       # a kernel without it: an explicit refusal, never an unconfined ClientApp
        from client.sandbox import SandboxUnavailable, confine

        with pytest.raises(SandboxUnavailable, match="Landlock"):
            confine(read=[], write=[], connect_ports=[1])
        return
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text("{}\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "st-mary").write_text("PRIVATE KEY")
    node = {"hospital": "st-mary", "data-path": str(tmp_path / "data" / "manifest.jsonl"),
            "state-dir": str(tmp_path / "state")}
    read, write = pinned.sandbox_paths(node)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        allowed, other = listener.getsockname()[1], 1
        script = textwrap.dedent(f"""
            import json, socket, sys
            from pathlib import Path
            from client.sandbox import confine
            Path({str(tmp_path / 'state')!r}).mkdir()
            confine(read={read!r}, write={write!r}, connect_ports=[{allowed}])
            out = {{}}
            def attempt(name, fn):
                try:
                    fn(); out[name] = "ok"
                except OSError as err:
                    out[name] = type(err).__name__
            attempt("read data", lambda: open({str(tmp_path / 'data' / 'manifest.jsonl')!r}).read())
            attempt("read key", lambda: open({str(tmp_path / 'keys' / 'st-mary')!r}).read())
            attempt("write data", lambda: open({str(tmp_path / 'data' / 'x')!r}, "w").write("x"))
            attempt("write state", lambda: open({str(tmp_path / 'state' / 'x')!r}, "w").write("x"))
            attempt("connect supernode", lambda: socket.create_connection(("127.0.0.1", {allowed})).close())
            attempt("connect elsewhere", lambda: socket.create_connection(("127.0.0.1", {other}), timeout=2))
            import torch                                          # the ClientApp's imports still work
            out["torch"] = float(torch.ones(3).sum())
            print(json.dumps(out))
        """)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"read data": "ok", "read key": "PermissionError", "write data": "PermissionError",
                   "write state": "ok", "connect supernode": "ok", "connect elsewhere": "PermissionError",
                   "torch": 3.0}


def test_the_public_gateway_refuses_everything_but_the_fleet_api():
    from starlette.testclient import TestClient

    gateway = create_gateway("https://127.0.0.1:1", ca=None, control="127.0.0.1:9093")
    with TestClient(gateway) as client:
        for path in ("/v1/control/start-run", "/v1/control/create-node-cli", "/v1/runtime/pull-messages", "/"):
            reply = client.post(path, content=b"\x00")
            assert reply.status_code == 403 and "only on the coordinator's own host (127.0.0.1:9093)" in reply.text


def test_the_gateway_says_retry_while_the_superlink_behind_it_is_down():
    """A SuperLink restarting behind the gateway is a 503 (Flower's SuperNodes retry it), not a 500
    (they would give up and exit: a coordinator restart would lose its hospitals)."""
    from starlette.testclient import TestClient

    gateway = create_gateway("http://127.0.0.1:1", ca=None, control="127.0.0.1:9093")   # nothing listens on 1
    with TestClient(gateway) as client:
        reply = client.post("/v1/fleet/pull-messages", content=b"\x00")
        assert reply.status_code == 503 and "not answering" in reply.text

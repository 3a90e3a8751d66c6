"""docs/deploy.md, run for real on 127.0.0.1: a SuperLink with TLS and node authentication, two
hospitals' SuperNodes with their own data folders on disk, 2 rounds through ``flwr run``, and a
third SuperNode with an unregistered key that must be refused.

The commands are the documentation's own (``STEPS``; a fast test checks that docs/deploy.md shows
each of them). Marked slow + deploy: about 3 minutes on 2 cores; every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "deploy.md"
# The values docs/deploy.md uses; the test substitutes free ports and its temp folder.
DOC_VALUES = {"port": 9092, "port_a": 9094, "port_b": 9095, "port_x": 9096, "run_dir": "/srv/medvlm/runs/consortium",
              "extra": ""}
STEPS = {
    "certs": "medvlm-fl certs --host 127.0.0.1 --out certs",
    "superlink": "medvlm-fl superlink --certs certs --host 127.0.0.1 --port {port}",
    "key_a": "medvlm-fl node-key --name hospital-a --out keys",
    "key_b": "medvlm-fl node-key --name hospital-b --out keys",
    "key_x": "medvlm-fl node-key --name intruder --out keys",
    "data_a": "medvlm-fl write-synthetic --hospital general --images 120 --out data/hospital-a",
    "data_b": "medvlm-fl write-synthetic --hospital oncology --images 120 --out data/hospital-b",
    "register_a": "flwr supernode register keys/hospital-a.pub consortium",
    "register_b": "flwr supernode register keys/hospital-b.pub consortium",
    "supernode_a": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/hospital-a "
                    "--hospital hospital-a --data-path data/hospital-a/manifest.jsonl --state-dir state/hospital-a "
                    "--port {port_a}"),
    "supernode_b": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/hospital-b "
                    "--hospital hospital-b --data-path data/hospital-b/manifest.jsonl --state-dir state/hospital-b "
                    "--port {port_b}"),
    "intruder": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/intruder "
                 "--hospital intruder --data-path data/hospital-a/manifest.jsonl --state-dir state/intruder "
                 "--port {port_x}"),
    "run": ("flwr run . consortium --stream --run-config "
            "'overrides=\"federation.rounds=2 federation.min_nodes=2{extra}\" run-dir=\"{run_dir}\"'"),
}
CONNECTION = """[superlink.consortium]
address = "127.0.0.1:{port}"
root-certificates = "{ca}"
"""


def test_deploy_doc_shows_every_command_the_e2e_test_runs():
    text = DOCS.read_text()
    for name, step in STEPS.items():
        assert step.format(**DOC_VALUES) in text, f"docs/deploy.md lacks step {name!r}: {step.format(**DOC_VALUES)}"
    assert CONNECTION.format(port=DOC_VALUES["port"], ca="/srv/medvlm/consortium/certs/ca.crt") in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.deploy
def test_two_hospitals_federate_over_tls_and_an_unregistered_node_is_refused(tmp_path):
    from medvlm.model.foundation import ensure_foundation

    ensure_foundation("tiny-random")   # built once here, not by every process at once
    work = tmp_path / "consortium"
    work.mkdir()
    values = {"port": _free_port(), "port_a": _free_port(), "port_b": _free_port(), "port_x": _free_port(),
              "run_dir": str(tmp_path / "runs" / "consortium"),
              # the doc's run, on the small random-init models, with SecAgg+ on top (docs/deploy.md)
              "extra": " " + " ".join(TINY_OVERRIDES + ["federation.secure_aggregation=secagg+"])}
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), OMP_NUM_THREADS="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    procs: list[subprocess.Popen] = []

    def run(name: str, *, cwd: Path = work, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(shlex.split(STEPS[name].format(**values)), cwd=cwd, env=env, text=True,
                             capture_output=True, timeout=timeout)
        assert out.returncode == 0, f"{name}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    def start(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(shlex.split(STEPS[name].format(**values)), cwd=work, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        for step in ("certs", "key_a", "key_b", "key_x", "data_a", "data_b"):
            run(step)
        home = Path(env["FLWR_HOME"])
        home.mkdir()
        (home / "config.toml").write_text('[superlink]\ndefault = "consortium"\n\n' + CONNECTION.format(
            port=values["port"], ca=work / "certs" / "ca.crt"))
        link, link_log = start("superlink")
        _wait_for_port(values["port"], link, link_log)
        run("register_a")
        run("register_b")
        start("supernode_a")
        start("supernode_b")
        intruder, intruder_log = start("intruder")
        assert intruder.wait(timeout=120) != 0                       # refused: its key is not registered
        assert "Failed to activate SuperNode" in intruder_log.read_text()

        started = time.monotonic()
        out = run("run", cwd=ROOT, timeout=480)
        print(f"flwr run: {time.monotonic() - started:.0f}s for 2 rounds")
        run_dir = Path(values["run_dir"])
        assert (run_dir / "summary.json").is_file(), f"flwr run:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["stopped"] == "completed"
        assert summary["hospitals"] == ["hospital-a", "hospital-b"]   # the intruder never took part
        assert all(0 < e <= 8.0 + 1e-6 for e in summary["epsilon"].values())
        for item in ("checkpoints/round-001", "checkpoints/round-002", "global/adapter_config.json",
                     "global/adapter_model.safetensors", "global/fusion.safetensors", "metrics.jsonl", "plots.png"):
            assert (run_dir / item).exists(), item
        for h in ("hospital-a", "hospital-b"):                       # ledgers stay at the sites
            ledger = json.loads((work / "state" / h / "privacy-ledger.json").read_text())
            assert ledger["rounds"] == [1, 2]
        assert not (work / "state" / "intruder" / "privacy-ledger.json").exists()
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
        assert {h["status"] for h in first["hospitals"].values()} == {"trained"}   # through SecAgg+
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

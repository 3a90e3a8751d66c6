"""docs/deploy.md, run for real on 127.0.0.1: a SuperLink with TLS and node authentication behind
its Fleet-only gateway, two hospitals' SuperNodes with their own data folders and privacy budgets,
2 rounds through ``flwr run``; then the attacks of a curious coordinator and an outsider, each of
which must be refused: an unregistered node, an outsider's ``flwr supernode register`` / ``flwr run``
through the public address, a run that proposes DP off and a larger budget, and a run of a modified
app that would ship a hospital's image. A second test captures a plaintext (``--insecure``) round on
the wire and looks for patient data in it.

The commands are the documentation's own (``STEPS``; a fast test checks that docs/deploy.md shows
each of them). Marked slow + deploy: about 7 minutes on 2 cores; every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.relay import Recorder, free_port, stop_processes, wait_for_port
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "deploy.md"
# The values docs/deploy.md uses; the test substitutes free ports and its temp folder.
DOC_VALUES = {"port": 9092, "control": 9093, "port_a": 9094, "port_b": 9095, "port_x": 9096,
              "run_dir": "/srv/medvlm/runs/consortium", "extra": ""}
STEPS = {
    "certs": "medvlm-fl certs --host 127.0.0.1 --out certs",
    "superlink": "medvlm-fl superlink --certs certs --host 127.0.0.1 --port {port} --control-port {control}",
    "key_a": "medvlm-fl node-key --name hospital-a --out keys",
    "key_b": "medvlm-fl node-key --name hospital-b --out keys",
    "key_x": "medvlm-fl node-key --name intruder --out keys",
    "data_a": "medvlm-fl write-synthetic --hospital general --images 120 --out data/hospital-a",
    "data_b": "medvlm-fl write-synthetic --hospital oncology --images 120 --out data/hospital-b",
    "register_a": "flwr supernode register keys/hospital-a.pub consortium",
    "register_b": "flwr supernode register keys/hospital-b.pub consortium",
    "supernode_a": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/hospital-a "
                    "--hospital hospital-a --data-path data/hospital-a/manifest.jsonl --state-dir state/hospital-a "
                    "--epsilon 8 --port {port_a}"),
    "supernode_b": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/hospital-b "
                    "--hospital hospital-b --data-path data/hospital-b/manifest.jsonl --state-dir state/hospital-b "
                    "--epsilon 4 --port {port_b}"),
    "intruder": ("medvlm-fl supernode --superlink 127.0.0.1:{port} --ca certs/ca.crt --key keys/intruder "
                 "--hospital intruder --data-path data/hospital-a/manifest.jsonl --state-dir state/intruder "
                 "--epsilon 8 --port {port_x}"),
    "run": ("flwr run . consortium --stream --run-config "
            "'overrides=\"federation.rounds=2 federation.min_nodes=2{extra}\" run-dir=\"{run_dir}\"'"),
    "outsider_register": "flwr supernode register keys/intruder.pub outsider",
}
CONNECTION = """[superlink.consortium]
address = "127.0.0.1:{control}"
root-certificates = "{ca}"
"""
OUTSIDER = """[superlink.outsider]
address = "127.0.0.1:{port}"
root-certificates = "{ca}"
"""
# file signatures long enough not to occur by chance in megabytes of tensors and signed headers:
# PNG's 8-byte magic, a JPEG's start + JFIF header, DICOM's preamble tag + the file meta group
SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff\xe0\x00\x10JFIF", "DICOM": b"DICM\x02\x00"}


def test_deploy_doc_shows_every_command_the_e2e_test_runs():
    text = DOCS.read_text()
    for name, step in STEPS.items():
        assert step.format(**DOC_VALUES) in text, f"docs/deploy.md lacks step {name!r}: {step.format(**DOC_VALUES)}"
    for block in (CONNECTION, OUTSIDER):
        assert block.format(**DOC_VALUES, ca="/srv/medvlm/consortium/certs/ca.crt") in text


class Deployment:
    """Processes of one deployment on 127.0.0.1 under ``tmp_path``; ``stop()`` ends every one."""

    def __init__(self, tmp_path: Path, **values: object):
        from medvlm.recipes.foundation import ensure_foundation

        ensure_foundation("tiny-random")   # built once here, not by every process at once
        self.tmp, self.work = tmp_path, tmp_path / "consortium"
        self.work.mkdir()
        self.values = {"port": free_port(), "control": free_port(), "port_a": free_port(), "port_b": free_port(),
                       "port_x": free_port(), "run_dir": str(tmp_path / "runs" / "consortium"), "extra": "",
                       **values}
        self.env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), OMP_NUM_THREADS="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.procs: list[subprocess.Popen] = []
        home = Path(self.env["FLWR_HOME"])
        home.mkdir()
        ca = self.work / "certs" / "ca.crt"
        (home / "config.toml").write_text('[superlink]\ndefault = "consortium"\n\n' + CONNECTION.format(
            **self.values, ca=ca) + "\n" + OUTSIDER.format(**self.values, ca=ca))

    def command(self, step: str) -> list[str]:
        return shlex.split(STEPS[step].format(**self.values)) if step in STEPS else shlex.split(step)

    def run(self, step: str, *, cwd: Path | None = None, timeout: float = 120,
            ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(self.command(step), cwd=cwd or self.work, env=self.env, text=True, capture_output=True,
                             timeout=timeout)
        if ok:
            assert out.returncode == 0, f"{step}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    def start(self, step: str, *, cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{step.split()[0]}-{len(self.procs)}.log"
        proc = subprocess.Popen(self.command(step), cwd=cwd or self.work, env=self.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        stop_processes(self.procs)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_config(rounds: int, run_dir: Path, extra: list[str]) -> str:
    overrides = " ".join([f"federation.rounds={rounds}", "federation.min_nodes=2", *TINY_OVERRIDES, *extra])
    return shlex.join(["--run-config", f'overrides="{overrides}" run-dir="{run_dir}"'])


def _modified_app(folder: Path) -> Path:
    """The curious coordinator's copy of the app: its ClientApp ships the first training image (and the
    node's private key) in the reply."""
    shutil.copytree(ROOT, folder, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "runs", "__pycache__",
                                                                "*.egg-info", ".pytest_cache"))
    app = folder / "client" / "app.py"
    app.write_text(app.read_text() + '''

_honest_train = train


def train(msg, context, defaults={}):  # noqa: B006
    import numpy as np
    from pathlib import Path
    from flwr.app import Array

    reply = _honest_train(msg, context, defaults)
    image = sorted((Path(str(context.node_config["data-path"])).parent / "images").iterdir())[0].read_bytes()
    reply.content["arrays"]["stolen"] = Array(np.frombuffer(image, dtype=np.uint8).copy())
    return reply
''')
    return folder


def _files_bytes(folder: Path, *, but: str) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != but)


@pytest.mark.slow
@pytest.mark.deploy
def test_two_hospitals_federate_over_tls_and_every_attack_is_refused(tmp_path):
    # the doc's run, on the small random-init models, with SecAgg+ on top (docs/deploy.md)
    d = Deployment(tmp_path, extra=" " + " ".join(TINY_OVERRIDES + ["federation.secure_aggregation=secagg+"]))
    try:
        for step in ("certs", "key_a", "key_b", "key_x", "data_a", "data_b"):
            d.run(step)
        link, link_log = d.start("superlink")
        wait_for_port(d.values["port"], link, log=link_log)
        wait_for_port(d.values["control"], link, log=link_log)
        d.run("register_a")
        d.run("register_b")
        _, log_a = d.start("supernode_a")
        _, log_b = d.start("supernode_b")
        intruder, intruder_log = d.start("intruder")
        assert intruder.wait(timeout=120) != 0                       # refused: its key is not registered
        assert "Failed to activate SuperNode" in intruder_log.read_text()
        assert "intruder.pub is not registered in this consortium" in intruder_log.read_text()   # what to do

        started = time.monotonic()
        out = d.run("run", cwd=ROOT, timeout=480)
        print(f"flwr run: {time.monotonic() - started:.0f}s for 2 rounds")
        run_dir = Path(d.values["run_dir"])
        assert (run_dir / "summary.json").is_file(), f"flwr run:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["stopped"] == "completed"
        assert summary["hospitals"] == ["hospital-a", "hospital-b"]   # the intruder never took part
        assert 0 < summary["epsilon"]["hospital-a"] <= 8.0 + 1e-6 and 0 < summary["epsilon"]["hospital-b"] <= 4.0 + 1e-6
        for item in ("checkpoints/round-001", "checkpoints/round-002", "global/adapter_config.json",
                     "global/adapter_model.safetensors", "global/fusion.safetensors", "metrics.jsonl", "plots.png"):
            assert (run_dir / item).exists(), item
        ledgers = {h: (d.work / "state" / h / "privacy-ledger.json").read_text() for h in ("hospital-a", "hospital-b")}
        for text in ledgers.values():                                 # ledgers stay at the sites
            assert json.loads(text)["rounds"] == [1, 2]
        assert json.loads((d.work / "state" / "intruder" / "privacy-ledger.json").read_text())["rounds"] == []
        assert {h["status"] for h in _records(run_dir)[1]["hospitals"].values()} == {"trained"}   # through SecAgg+

        # an outsider with ca.crt and the public address: Control API refused at the gateway
        refused = d.run("outsider_register", ok=False)
        assert refused.returncode != 0 and "403" in refused.stdout + refused.stderr
        refused = d.run(shlex.join(["flwr", "run", ".", "outsider"]), cwd=ROOT, ok=False)
        assert refused.returncode != 0 and "403" in refused.stdout + refused.stderr
        assert "gateway refused POST /v1/control/" in link_log.read_text()

        # the coordinator proposes DP off and epsilon 50: the sites keep their own settings (budgets spent);
        # hospital-a has lost its ledger meanwhile: it refuses to train rather than start from zero
        ledger_a = d.work / "state" / "hospital-a" / "privacy-ledger.json"
        ledger_a.rename(ledger_a.with_suffix(".away"))
        weak = tmp_path / "runs" / "weak"
        d.run(f"flwr run . consortium --stream {_run_config(1, weak, ['privacy.enabled=false', 'privacy.target_epsilon=50'])}",
              cwd=ROOT, timeout=300)
        record = _records(weak)[1]
        assert record["hospitals"]["hospital-b"]["status"] == "budget-exhausted"
        assert "privacy.enabled=False proposed, True applied" in record["hospitals"]["hospital-b"]["privacy"]
        assert "privacy.target_epsilon=50.0 proposed, 4.0 applied" in record["hospitals"]["hospital-b"]["privacy"]
        assert any("refused by hospital-a" not in f["reason"] and "is missing" in f["reason"] for f in record["failed"]), \
            record["failed"]
        assert not ledger_a.exists()                                  # nothing started a fresh ledger
        ledger_a.with_suffix(".away").rename(ledger_a)
        assert {h: (d.work / "state" / h / "privacy-ledger.json").read_text() for h in ledgers} == ledgers

        # the coordinator runs a modified app that would ship an image: refused at both sites, before it runs
        evil = tmp_path / "runs" / "evil"
        out = d.run(f"flwr run {_modified_app(tmp_path / 'evil-app')} consortium --stream {_run_config(1, evil, [])}",
                    cwd=ROOT, timeout=300)
        failed = {f["reason"] for r in _records(evil) for f in r.get("failed", [])}
        for h, log in (("hospital-a", log_a), ("hospital-b", log_b)):
            assert any(f"refused by {h}" in r and "client/app.py (changed)" in r for r in failed), failed
            assert f"refused by {h}: the run's app is not the app this hospital installed" in log.read_text()
        received = _files_bytes(evil, but="plots.png") + out.stdout.encode() + out.stderr.encode()
        image = sorted((d.work / "data" / "hospital-a" / "images").iterdir())[0].read_bytes()
        assert SIGNATURES["PNG"] not in received                     # (the run's own plots.png aside)
        assert image[40:140] not in received + (evil / "plots.png").read_bytes()
        assert {h: (d.work / "state" / h / "privacy-ledger.json").read_text() for h in ledgers} == ledgers
    finally:
        d.stop()


@pytest.mark.slow
@pytest.mark.deploy
def test_a_plaintext_round_on_the_wire_carries_no_patient_data(tmp_path):
    d = Deployment(tmp_path)
    recorder = None
    try:
        d.run("data_a")
        _plain_link(d, tmp_path / "db" / "link.db")
        recorder = Recorder(d.values["port"])
        d.start(f"medvlm-fl supernode --insecure --superlink 127.0.0.1:{recorder.port} --hospital hospital-a "
                f"--data-path data/hospital-a/manifest.jsonl --state-dir state/hospital-a --epsilon 8 "
                f"--port {d.values['port_a']}")
        run_dir = tmp_path / "runs" / "plain"
        config_arg = _run_config(1, run_dir, []).replace("federation.min_nodes=2", "federation.min_nodes=1")
        d.run(f"flwr run . consortium --stream {config_arg}", cwd=ROOT, timeout=300)
        assert _records(run_dir)[1]["hospitals"]["hospital-a"]["status"] == "trained"
        wire = bytes(recorder.up)                                   # everything that left the hospital
        assert b"POST /v1/fleet/push-messages" in wire and len(wire) > 100_000   # the round really is on it
        for kind, signature in SIGNATURES.items():
            assert signature not in wire, f"a {kind} file signature crossed the wire"
        for image in sorted((d.work / "data" / "hospital-a" / "images").iterdir())[:20]:
            assert image.read_bytes()[40:140] not in wire, f"bytes of {image.name} crossed the wire"
        rows = [json.loads(line) for line in (d.work / "data" / "hospital-a" / "manifest.jsonl").read_text().splitlines()]
        texts = {r["question"] for r in rows} | {r["answer"] for r in rows if len(r["answer"]) >= 8} | \
            {Path(r["image"]).name for r in rows} | {r["report"] for r in rows if r.get("report")}
        leaked = sorted(t for t in texts if t.encode() in wire)
        assert not leaked, f"manifest text on the wire: {leaked[:5]}"
    finally:
        if recorder:
            recorder.close()
        d.stop()


def _plain_link(d: Deployment, db: Path) -> subprocess.Popen:
    """A plaintext SuperLink (its state in ``db``), and the coordinator's ``flwr`` set to reach it so."""
    link, link_log = d.start(f"medvlm-fl superlink --insecure --host 127.0.0.1 --port {d.values['port']} "
                             f"--control-port {d.values['control']} --database {db}")
    wait_for_port(d.values["port"], link, log=link_log)
    wait_for_port(d.values["control"], link, log=link_log)
    config = Path(d.env["FLWR_HOME"]) / "config.toml"
    if "insecure = true" not in config.read_text():
        config.write_text(config.read_text().replace('root-certificates = ', 'insecure = true\n# '))
    return link


# ----------------------------------------------------------------------------- faults, in real processes
def _plain_consortium(d: Deployment, db: Path) -> tuple[subprocess.Popen, dict[str, subprocess.Popen]]:
    """Hospitals a and b's data, a plaintext SuperLink and their SuperNodes: the fault tests' set-up."""
    d.run("data_a")
    d.run("data_b")
    link = _plain_link(d, db)
    nodes = {}
    for h, eps, port in (("a", 8, d.values["port_a"]), ("b", 8, d.values["port_b"])):
        nodes[h], _ = d.start(f"medvlm-fl supernode --insecure --superlink 127.0.0.1:{d.values['port']} "
                              f"--hospital hospital-{h} --data-path data/hospital-{h}/manifest.jsonl "
                              f"--state-dir state/hospital-{h} --epsilon {eps} --port {port}")
    return link, nodes


def _wait_for(condition, what: str, timeout: float = 300, procs: tuple = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s")


def _task_running(hospital: str) -> bool:
    out = subprocess.run(["pgrep", "-f", f"client.pinned .*--hospital {hospital} "], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _ledger(d: Deployment, h: str) -> dict:
    path = d.work / "state" / f"hospital-{h}" / "privacy-ledger.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.slow
@pytest.mark.deploy
def test_a_hospital_killed_mid_round_is_one_true_failure_and_the_run_stops_saying_who_is_missing(tmp_path):
    d = Deployment(tmp_path)
    try:
        link, nodes = _plain_consortium(d, tmp_path / "db" / "link.db")
        run_dir = tmp_path / "runs" / "killed-node"
        config_arg = _run_config(2, run_dir, ["federation.node_wait_s=20", "federation.timeout_s=400"])
        run, run_log = d.start(f"flwr run . consortium --stream {config_arg}", cwd=ROOT)
        state = run_dir / "server-state.json"
        _wait_for(lambda: state.is_file() and json.loads(state.read_text())["round"] == 0, "round 0 evaluated",
                  procs=((run, run_log),))
        _wait_for(lambda: _task_running("hospital-b"), "hospital-b trains round 1")
        os.killpg(nodes["b"].pid, signal.SIGKILL)                      # the SuperNode, its launcher and task
        _wait_for(lambda: (run_dir / "summary.json").is_file(), "the run ends", timeout=400)
        records, summary = _records(run_dir), json.loads((run_dir / "summary.json").read_text())
        one = records[1]
        assert one["hospitals"]["hospital-a"]["status"] == "trained"
        assert len(one["failed"]) == 1, one["failed"]                 # one failure, one record, the true reason
        failure = one["failed"][0]
        assert failure["hospital"] == "hospital-b" and failure["reason"].startswith("node unavailable"), failure
        assert "timeout" not in failure["reason"]
        assert one["evaluated_hospitals"] == ["hospital-a"]
        assert "stopped before round 2: 1 of federation.min_nodes=2 hospitals connected" in summary["stopped"]
        assert "not connected: hospital-b (node" in summary["stopped"]
        assert _ledger(d, "b").get("rounds", []) == []                 # killed mid-training: nothing charged
        assert _ledger(d, "a")["rounds"] == [1]
    finally:
        d.stop()


@pytest.mark.slow
@pytest.mark.deploy
def test_a_coordinator_killed_mid_round_and_resumed_spends_no_privacy_twice(tmp_path):
    from medvlm.privacy import epsilon

    d = Deployment(tmp_path)
    try:
        db = tmp_path / "db" / "link.db"
        link, nodes = _plain_consortium(d, db)
        run_dir = tmp_path / "runs" / "resumed"
        config_arg = _run_config(2, run_dir, [])
        d.start(f"flwr run . consortium --stream {config_arg}", cwd=ROOT)
        # killed once a hospital has trained and charged round 2, before the round is aggregated
        _wait_for(lambda: 2 in _ledger(d, "a").get("rounds", []) or 2 in _ledger(d, "b").get("rounds", []),
                  "a hospital charged round 2")
        os.killpg(link.pid, signal.SIGKILL)                           # the SuperLink and its ServerApp
        saved = json.loads((run_dir / "server-state.json").read_text())
        assert saved["round"] == 1, "the coordinator had already finished round 2"
        _plain_link(d, db)
        d.run(f"flwr run . consortium --stream {config_arg}", cwd=ROOT, timeout=400)
        _wait_for(lambda: (run_dir / "summary.json").is_file(), "the resumed run ends", timeout=120)
        summary, records = json.loads((run_dir / "summary.json").read_text()), _records(run_dir)
        assert [r["round"] for r in records] == [0, 1, 2] and summary["rounds"] == 2
        resent = [h for h, e in records[2]["hospitals"].items() if e.get("resent")]
        assert resent, records[2]["hospitals"]                        # the charged update, sent again
        for h in ("a", "b"):
            ledger = _ledger(d, h)
            assert ledger["rounds"] == [1, 2], ledger["rounds"]          # each round charged once
            p = summary["privacy"][f"hospital-{h}"]
            history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in p["mechanisms"]]
            assert sum(x[2] for x in history) == p["steps"] == sum(x[2] for x in ledger["history"])
            assert epsilon(history, delta=p["delta"], accountant=p["accountant"]) == pytest.approx(p["epsilon"])
            assert p["epsilon"] == pytest.approx(epsilon(ledger["history"], delta=ledger["delta"],
                                                         accountant=ledger["accountant"]))
    finally:
        d.stop()

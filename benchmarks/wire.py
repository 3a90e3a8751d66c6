"""Bytes on the wire as they are: a real deployment on 127.0.0.1 (``medvlm-fl superlink
--insecure``, one hospital's ``medvlm-fl supernode``, ``flwr run``), with a recording relay
between the SuperNode and the SuperLink. Everything the hospital sends and receives is counted as
HTTP exchanges (headers and bodies) and set next to the payload the run reports
(``bytes_up`` / ``bytes_down`` in metrics.jsonl: the serialised arrays).

    python -m benchmarks.wire [--rounds 2] [--images 40] [overrides ...]

Plaintext so that the relay can read it; TLS adds its record framing (about 0.1%) on top. The
traffic between rounds (heartbeats, polling for messages) depends on how long the hospital
trains, so it is shown apart from the rounds' own exchanges.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one hospital, the default architecture with random weights (bytes depend on shapes only)
OVERRIDES = ["model.init=random", "model.vision.source=builtin:tiny-random",
             "model.language.source=builtin:tiny-random", "train.batch_size=16", "federation.min_nodes=1"]
# what carries a round's messages; the rest (heartbeats, the app bundle, registration) is session upkeep
ROUND_PATHS = ("push-object", "pull-object", "push-messages", "pull-messages", "confirm-message-received")


def measure(rounds: int, images: int, overrides: list[str], work: Path) -> dict:
    """Run the deployment once; returns the recorded exchanges and the run's reported payload."""
    from simulations.relay import Recorder, by_path, free_port, stop_processes, wait_for_port

    port, control, node_port = free_port(), free_port(), free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{control}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    procs: list[subprocess.Popen] = []

    def start(command: str) -> subprocess.Popen:
        with (work / f"{command.split()[1]}.log").open("w") as log:   # the child keeps its own handle
            proc = subprocess.Popen(shlex.split(command), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        return proc

    recorder = None
    try:
        subprocess.run(shlex.split(f"medvlm-fl write-synthetic --hospital general --images {images} --out data"),
                       cwd=work, env=env, check=True, capture_output=True)
        link = start(f"medvlm-fl superlink --insecure --host 127.0.0.1 --port {port} --control-port {control} "
                     f"--database {work / 'link.db'}")
        wait_for_port(port, link, timeout=120)
        wait_for_port(control, link, timeout=120)
        recorder = Recorder(port)
        start(f"medvlm-fl supernode --insecure --superlink 127.0.0.1:{recorder.port} --hospital hospital-a "
              f"--data-path data/manifest.jsonl --state-dir state --epsilon 8 --port {node_port}")
        run_dir = work / "run"
        config = f'overrides="{" ".join([f"federation.rounds={rounds}", *OVERRIDES, *overrides])}" run-dir="{run_dir}"'
        out = subprocess.run(["flwr", "run", str(ROOT), "local", "--stream", "--run-config", config], cwd=work,
                             env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0 or not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"flwr run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        time.sleep(2)   # the last replies' confirmations
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        payload_up = [r["hospitals"]["hospital-a"]["bytes_up"] for r in records[1:]]
        # round 0 is the start's evaluation: its download is on the wire too
        payload_down = [r.get("bytes_down", 0) + r.get("bytes_down_evaluate", 0) for r in records]
        return {"paths": by_path(recorder.exchanges()), "payload_up": payload_up, "payload_down": payload_down,
                "rounds": len(records) - 1}
    finally:
        if recorder:
            recorder.close()
        stop_processes(procs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from medvlm.recipes.foundation import ensure_foundation

    ensure_foundation("tiny-random")
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(args.rounds, args.images, args.overrides, Path(tmp))
    n = m["rounds"]
    print(f"one hospital, {n} rounds (and the start's evaluation), plaintext HTTP (Flower 1.41 REST), "
          f"{args.images} images; per round:")
    print(f"{'path':34s}{'requests':>10s}{'up bytes':>12s}{'up headers':>12s}{'down bytes':>13s}{'down headers':>14s}")
    totals = dict.fromkeys(("requests", "up", "up_head", "down", "down_head"), 0)
    upkeep = dict(totals)
    for path, row in m["paths"].items():
        print(f"{path:34s}{row['requests'] / n:10.1f}{row['up'] / n:12,.0f}{row['up_head'] / n:12,.0f}"
              f"{row['down'] / n:13,.0f}{row['down_head'] / n:14,.0f}")
        into = totals if path.rsplit("/", 1)[-1] in ROUND_PATHS else upkeep
        for k in into:
            into[k] += row[k]
    payload_up, payload_down = sum(m["payload_up"]) / n, sum(m["payload_down"]) / n
    print(f"\nround exchanges: {totals['requests'] / n:.0f} requests; up {totals['up'] / n:,.0f} bytes "
          f"({totals['up_head'] / n:,.0f} in headers) against a payload of {payload_up:,.0f} "
          f"(wire/payload {totals['up'] / n / payload_up:.2f}x); down {totals['down'] / n:,.0f} bytes against "
          f"{payload_down:,.0f} (wire/payload {totals['down'] / n / payload_down:.2f}x)")
    print(f"session upkeep (heartbeats, polling): {upkeep['requests'] / n:.0f} requests, "
          f"{(upkeep['up'] + upkeep['down']) / n:,.0f} bytes per round")


if __name__ == "__main__":
    main()

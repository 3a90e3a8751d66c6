"""Only the code a hospital installed runs at the hospital.

Flower's SuperNode normally installs the app bundle (FAB) that ``flwr run`` sends and runs *its*
ClientApp: whoever can start a run chooses the code that reads the hospital's images. Here the
SuperNode runs with ``--isolation process`` (it starts no app itself) and the hospital's own
launcher (``medvlm-fl supernode``) serves its tasks:

1. At start the launcher pins the app this site installed: the SHA-256 of every code file
   (``*.py``, ``*.yaml``, ``*.json``, ``*.toml`` except ``pyproject.toml``) in the bundle Flower's own
   ``flwr build`` rules make from the installed project. ``--app-digest`` pins a digest the
   hospital reviewed, and the launcher refuses to start if its installation differs from it.
2. For each task the SuperNode hands out (``AcquireTask`` on its local runtime port), the launcher
   starts ``python -m client.pinned`` — the *installed* code — which confines itself (Landlock:
   reads code, model cache and data; writes its state dir; connects only to the SuperNode's local
   port), pulls the task, and compares the run's FAB file by file with the pin. Any difference
   (a changed, added or missing file) is refused before anything of it runs: the reply is an error
   naming the files, logged at the site. Otherwise the installed ``client.app:app`` handles the
   message. The FAB's own code is never imported, installed or executed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger("medvlm.client")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml")
NOT_PINNED = ("pyproject.toml", ".info/")    # Flower rewrites pyproject.toml inside a FAB; .info is its manifest
PIN_FILE = "pinned-app.json"


class AppRefused(RuntimeError):
    """The coordinator's app differs from the one this hospital installed."""


# ---------------------------------------------------------------------------------------- pinning
def code_files(fab: bytes) -> dict[str, str]:
    """{path: sha256} of the code files in a FAB (a zip archive)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest() for name in sorted(archive.namelist())
                if name.endswith(CODE_SUFFIXES) and not name.startswith(NOT_PINNED)}


def digest(files: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(f"{path}\0{sha}\n" for path, sha in sorted(files.items())).encode()).hexdigest()


def installed_files(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The installed app's code files, bundled by Flower's own ``flwr build`` rules (a few seconds)."""
    from flwr.cli.build import build_fab_from_disk

    return code_files(build_fab_from_disk(root))


def differences(theirs: Mapping[str, str], ours: Mapping[str, str]) -> list[str]:
    """Human-readable file differences between the coordinator's app and the pinned one."""
    out = [f"{p} (changed)" for p in sorted(set(theirs) & set(ours)) if theirs[p] != ours[p]]
    out += [f"{p} (not in this site's app)" for p in sorted(set(theirs) - set(ours))]
    out += [f"{p} (missing from the run's app)" for p in sorted(set(ours) - set(theirs))]
    return out


def write_pin(folder: Path, files: Mapping[str, str]) -> Path:
    from medvlm.runs import write_json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PIN_FILE
    write_json(path, {"digest": digest(files), "files": dict(files)})
    return path


def read_pin(path: Path, expected: str) -> dict[str, str]:
    """The pinned file list, checked against the digest the launcher passed on the command line."""
    files = json.loads(path.read_text())["files"]
    if digest(files) != expected:
        raise AppRefused(f"{path} does not match the digest this site pinned ({expected[:12]}): refusing every task")
    return files


def check_fab(fab: bytes, pinned: Mapping[str, str], *, hospital: str) -> None:
    diffs = differences(code_files(fab), pinned)
    if diffs:
        shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise AppRefused(f"refused by {hospital}: the run's app is not the app this hospital installed "
                         f"(pinned digest {digest(pinned)[:12]}): {shown}. Nothing of it was run.")


# ---------------------------------------------------------------------------------------- the sandbox
def sandbox_paths(node_config: Mapping[str, object], *, extra_read: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(read, write) roots of a task process: code, system files, model cache and data to read; the
    state dir, the model cache (public models built on first use) and devices to write."""
    from client.sandbox import SYSTEM_READ, SYSTEM_WRITE
    from medvlm.files import cache_root

    data = []
    for key, value in node_config.items():
        if key == "data-path" or key.startswith("data-path-"):
            p = Path(str(value)).resolve()
            data.append(str(p.parent if p.is_file() else p))
    code = {str(PROJECT_ROOT), sys.prefix, sys.base_prefix, sys.exec_prefix,
            *(p for p in sys.path if p and Path(p).exists())}
    read = sorted(code) + list(SYSTEM_READ) + data + [str(Path(p).resolve()) for p in extra_read]
    write = [str(Path(str(node_config["state-dir"])).resolve()), str(cache_root()), *SYSTEM_WRITE]
    return read, write


# ---------------------------------------------------------------------------------------- one task
def run_task(*, runtime_address: str, token: str, pin: Path, pinned_digest: str, hospital: str,
             read: Sequence[str], write: Sequence[str], sandbox: bool = True) -> int:
    """Serve one SuperNode task with the installed ClientApp (a process of its own, like flwr-clientapp)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    pinned = read_pin(pin, pinned_digest)   # read before confinement (the pin lies outside the sandbox)
    if write:   # temporary files go to the state dir, the one place the task may write
        tmp = Path(write[0]) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ.update(TMPDIR=str(tmp), MPLCONFIGDIR=str(tmp))
    if sandbox:
        from client.sandbox import confine

        confine(read=read, write=write, connect_ports=[int(runtime_address.rsplit(":", 1)[1])])
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)], retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, _run, fab = pull_task_input(client)
        check_fab(fab.content, pinned, hospital=hospital)
        from client.app import app   # the installed ClientApp, never the FAB's

        reply = app(message=message, context=context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as err:  # noqa: BLE001 - every failure becomes the reply's error, with its reason
        details = str(err) if isinstance(err, AppRefused) else f"{type(err).__name__}: {err}"
        log.error("%s", details, exc_info=not isinstance(err, AppRefused))
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details[:2000]),
                            reply_to=message)
    finally:
        if reply is not None and context is not None:
            push_message(client, reply, context)
        push_task_output(client=client, context=context, sub_status=status, details=details[:2000])
        heartbeat.stop()
        client.close()
    return code


# ---------------------------------------------------------------------------------------- the executor
def serve(*, runtime_address: str, supernode: subprocess.Popen, task_argv: Sequence[str],
          env: Mapping[str, str], poll_s: float = 0.5) -> int:
    """Hand every ClientApp task of the SuperNode to a pinned task process, until the SuperNode
    exits; returns its exit code. (What ``flower-superexec`` does, with our task command.)"""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    import socket

    host, port = runtime_address.rsplit(":", 1)
    while supernode.poll() is None:     # the SuperNode opens its runtime port once it is connected
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                break
        time.sleep(poll_s)
    retry = make_simple_http_retry_invoker()
    retry.max_tries = 1     # never retry past a SuperNode that has exited: the loop below checks it
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")], retry_invoker=retry)
    tasks: list[subprocess.Popen] = []
    try:
        while supernode.poll() is None:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as err:  # noqa: BLE001 - the SuperNode is still starting (or stopping)
                log.debug("runtime API at %s not ready: %s", runtime_address, err)
                time.sleep(poll_s)
                continue
            if res.HasField("task") and res.token:
                log.info("task %d of run %d: starting the installed ClientApp", res.task.task_id, res.task.run_id)
                tasks.append(subprocess.Popen([*task_argv, "--token", res.token], env=dict(env)))
            tasks = [t for t in tasks if t.poll() is None]
            time.sleep(poll_s)
    finally:
        client.close()
        for t in tasks:
            if t.poll() is None:
                t.terminate()
    return supernode.returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="one pinned ClientApp task (started by medvlm-fl supernode)")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--pin", required=True, type=Path)
    p.add_argument("--digest", required=True)
    p.add_argument("--hospital", required=True)
    p.add_argument("--sandbox", required=True, help="JSON {read: [...], write: [...]} or 'off'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per runtime request is noise
    box = None if args.sandbox == "off" else json.loads(args.sandbox)
    return run_task(runtime_address=args.runtime_api_address, token=args.token, pin=args.pin,
                    pinned_digest=args.digest, hospital=args.hospital, read=(box or {}).get("read", ()),
                    write=(box or {}).get("write", ()), sandbox=box is not None)


if __name__ == "__main__":
    sys.exit(main())

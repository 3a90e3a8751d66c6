"""A plaintext wire, recorded: a TCP relay on 127.0.0.1 that keeps every byte it forwards, per
connection and direction, and a reader of the HTTP/1.1 exchanges in what it kept.

Put between an ``--insecure`` SuperNode and its SuperLink, it shows what a deployment really sends:
the payload and Flower's protocol around it (one HTTP request per object pushed or pulled, each
with its headers). ``tests/test_deploy_e2e.py`` searches it for patient data;
``benchmarks/wire.py`` counts it. Both start their processes with the two helpers here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, *, log: Optional[Path] = None, timeout: float = 90) -> None:
    """Wait until ``proc`` listens on ``127.0.0.1:port``; raise, with the end of its ``log``, when it
    exits first or does not listen within ``timeout`` seconds."""
    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}) before listening on {port}{tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s{tail()}")


def stop_processes(procs: list[subprocess.Popen], *, grace: float = 15) -> None:
    """End every process group started with ``start_new_session=True``: SIGTERM, then SIGKILL for
    whatever is still running after ``grace`` seconds in all."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Recorder:
    """Forwards connections from ``127.0.0.1:<port>`` to ``127.0.0.1:<target>`` and keeps their bytes:
    ``connections`` is a list of ``(up, down)`` pairs, ``up`` being what the client sent (for a
    SuperNode: what leaves the hospital) and ``down`` what it received."""

    def __init__(self, target: int):
        self.target = target
        self.connections: list[tuple[bytearray, bytearray]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def up(self) -> bytes:
        with self.lock:
            return b"".join(bytes(up) for up, _ in self.connections)

    @property
    def down(self) -> bytes:
        with self.lock:
            return b"".join(bytes(down) for _, down in self.connections)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:      # the target is gone (shutting down): drop this connection
                conn.close()
                continue
            pair = (bytearray(), bytearray())
            with self.lock:
                self.connections.append(pair)
            for a, b, into in ((conn, upstream, pair[0]), (upstream, conn, pair[1])):
                threading.Thread(target=self._pipe, args=(a, b, into), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, into: bytearray) -> None:
        with contextlib.suppress(OSError):    # a closed connection ends the relay of that direction
            while chunk := src.recv(65536):
                with self.lock:
                    into += chunk
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()

    def exchanges(self) -> list[Exchange]:
        """Every complete request/response pair on every connection, in order per connection."""
        with self.lock:
            pairs = [(bytes(up), bytes(down)) for up, down in self.connections]
        out = []
        for up, down in pairs:
            requests, responses = http_messages(up), http_messages(down)
            for (line, head, body), (_, rhead, rbody) in zip(requests, responses):
                method, path = (line.split(" ") + ["", ""])[:2]
                out.append(Exchange(method, path.split("?")[0], head, body, rhead, rbody))
        return out


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    request_head: int      # bytes: start line + headers
    request_body: int
    response_head: int
    response_body: int


def http_messages(stream: bytes) -> list[tuple[str, int, int]]:
    """``(start line, head bytes, body bytes)`` of each complete HTTP/1.1 message in one direction
    of one connection (bodies sized by Content-Length or chunked; an incomplete tail is left out)."""
    out, i = [], 0
    while (end := stream.find(b"\r\n\r\n", i)) >= 0:
        head = stream[i:end + 4]
        lines = head.split(b"\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
        start = end + 4
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            j = start
            while True:
                eol = stream.find(b"\r\n", j)
                if eol < 0:
                    return out
                size = int(stream[j:eol].split(b";")[0], 16)
                j = eol + 2 + size + 2
                if size == 0:
                    break
            body = j - start
        else:
            body = int(fields.get(b"content-length", b"0"))
        if start + body > len(stream):
            break
        out.append((lines[0].decode("latin-1"), len(head), body))
        i = start + body
    return out


def by_path(exchanges: list[Exchange]) -> dict[str, dict[str, int]]:
    """Requests and bytes each way per path: ``{path: {requests, up, down, up_head, down_head}}``."""
    table: dict[str, Counter] = {}
    for e in exchanges:
        row = table.setdefault(e.path, Counter())
        row.update(requests=1, up=e.request_head + e.request_body, down=e.response_head + e.response_body,
                   up_head=e.request_head, down_head=e.response_head)
    return {path: dict(row) for path, row in sorted(table.items())}

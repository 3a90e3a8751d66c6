"""A tiny in-process Flower Grid: the real ServerApp loop and the real ClientApp handlers, with
messages delivered by function call instead of a SuperLink (fast, no Ray, one process). A handler
that raises becomes an error reply, as Flower turns a crashing ClientApp into one. The tests drive
the federation with it (crashes, kills, timeouts), and so do the benchmarks (``run_inprocess``)."""

from __future__ import annotations

import copy
import uuid
from typing import Callable, Iterable, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message, Context], Message]


def set_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class Killed(Exception):
    """The coordinator process died (kill -9, power cut) at the start of a round, or after the
    hospitals trained it but before their replies were aggregated."""


class InProcessGrid(Grid):
    def __init__(self, nodes: dict[int, dict], handlers: dict[str, Handler],
                 run_config: Optional[dict] = None, overrides: Optional[dict[int, dict[str, Handler]]] = None,
                 kill_at_round: Optional[int] = None, silent: Optional[set[int]] = None,
                 kill_after_training: Optional[int] = None, unavailable: Optional[set[int]] = None):
        set_task_identity()
        self.kill_at_round = kill_at_round
        self.kill_after_training = kill_after_training   # dies once the hospitals trained this round, replies lost
        self.silent = silent or set()          # nodes whose replies never arrive (a timeout)
        self.unavailable = unavailable or set()   # nodes the SuperLink reports gone (no heartbeat): still listed
        self.nodes = nodes                     # node id -> node config
        self.handlers = handlers               # "train" / "evaluate" -> handler
        self.overrides = overrides or {}       # node id -> {"train": handler} (e.g. one that raises)
        self.run_config = dict(run_config or {})
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(),
                                    run_config=self.run_config) for n, c in nodes.items()}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    # the parts of the Grid API the strategy and the ServerApp use
    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            config = msg.content.config_records.get("config") or msg.content.config_records.get("fitins.config") or {}
            if self.kill_at_round and int(config.get("server-round", 0)) >= self.kill_at_round:
                raise Killed(f"killed at round {self.kill_at_round}")
            if not msg.metadata.message_id:     # Flower's grid gives each pushed message its id
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.unavailable:       # the SuperLink's own error reply, from the SuperLink's node id
                from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
                continue
            handler = self.overrides.get(node, {}).get(msg.metadata.message_type) or \
                self.handlers[msg.metadata.message_type]
            try:   # a real transport delivers a copy: handlers and mods may edit what they receive
                reply = handler(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # noqa: BLE001 - what Flower does with a crashing ClientApp
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err)}:<'{err}'>"),
                                reply_to=msg)
            replies.append(reply)
            if self.kill_after_training and msg.metadata.message_type == "train" and \
                    int(config.get("server-round", 0)) >= self.kill_after_training and len(replies) == len(self.nodes):
                raise Killed(f"killed in round {self.kill_after_training} after the hospitals trained")
        self.received += replies
        return replies

    # unused abstract parts
    def set_run(self, run_id: int) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError


def run_inprocess(preset: str, overrides: list[str], run_dir, *, node_overrides: Optional[dict] = None) -> dict:
    """A whole federation of the configured synthetic hospitals in this process; returns summary.json."""
    import shlex
    from pathlib import Path

    from client import app as client_app
    from medvlm.config import load_config
    from server.app import run_federation

    cfg = load_config(preset, list(overrides))
    nodes = {10 + i: {"partition-id": i} for i in range(len(cfg.data.hospitals))}
    grid = InProcessGrid(nodes, {"train": client_app.train, "evaluate": client_app.evaluate},
                         {"preset": preset, "overrides": shlex.join(overrides)}, overrides=node_overrides)
    return run_federation(grid, cfg, Path(run_dir))


def poisoned(handler: Handler, factor: float) -> Handler:
    """A hospital that attacks the federation: it trains honestly, then sends ``global + factor *
    its change`` (factor -10: sign-flipped and scaled; 20: scaled). fp32 transport only."""
    from flwr.app import Array, ArrayRecord

    from medvlm.wire import pack, unpack

    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("transport", "fp32") != "fp32":
            raise ValueError("the poisoning simulation sends fp32 weights: use federation.transport=fp32")
        sent = unpack({k: a.numpy() for k, a in msg.content["arrays"].items()})
        reply = handler(msg, context)
        if reply.has_content() and "arrays" in reply.content.array_records:
            honest = unpack({k: a.numpy() for k, a in reply.content["arrays"].items()})
            reply.content["arrays"] = ArrayRecord({k: Array(a) for k, a in pack({
                k: (sent[k] + factor * (a - sent[k])).astype(a.dtype) for k, a in honest.items()}).items()})
        return reply
    return train

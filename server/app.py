"""The coordinator's Flower ServerApp: rounds of sample -> train (DP, on site) -> validate ->
FedAvg -> federated evaluation -> checkpoint -> log, resumable from its run folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medvlm.build import build_skeleton
from medvlm.config import (SERVER_OPTIMIZERS, ExperimentConfig, Stage, from_run_config, lr_window, stage_at,
                           stages, to_dict)
from medvlm.model.vlm import MedVLM
from medvlm.runs import new_run_dir, save_config
from medvlm.wire import check_transport, from_wire, require_float32, to_wire
from server.checkpoint import Checkpoints
from server.model_card import write_model_card
from server.report import (RoundLog, build_summary, central_dp_block, central_releases, round_record, update_privacy,
                           write_summary)
from server.secagg import check_secure_aggregation, secure_train_round
from server.strategy import CentralDP, RoundReport, Screened, make_strategy

log = logging.getLogger("medvlm.server")
NO_DEFAULTS: Mapping = MappingProxyType({})   # read-only: no run-config fallbacks


def _arrays(state) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in to_wire(state).items()})


@dataclass
class Rounds:
    """What every step of a round works with, set up once (fresh, or resumed from the run folder)."""

    grid: Grid
    cfg: ExperimentConfig
    run_dir: Path
    skeleton: MedVLM                  # the coordinator's model: the LLM's weights never loaded
    spec: dict
    checkpoints: Checkpoints
    log: RoundLog
    strategy: Screened                # what is aggregated, and how
    aggregator: Screened | CentralDP  # the strategy, or CentralDP around it
    started: float


def set_up(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> tuple[Rounds, dict, int, dict]:
    """The run's (rounds, global state, first round, privacy block so far), from its checkpoint if any."""
    fed = cfg.federation
    run_dir.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(cfg.model, seed=fed.seed)
    spec = skeleton.trainable_spec()
    checkpoints = Checkpoints(run_dir, skeleton)
    resumed = checkpoints.load(cfg)
    if resumed:
        server_state, state = resumed
        first, records, privacy = server_state["round"] + 1, server_state["records"], server_state["privacy"]
        log.info("resuming %s after round %d", run_dir, first - 1)
        if [rec["round"] for rec in records] == [0] and not (records[0]["evaluated_hospitals"] or
                                                              records[0]["not_evaluated"]):
            records = []    # round 0's evaluation failed everywhere: the start is evaluated again
            log.info("round 0 (the start) was not evaluated by any hospital: evaluating it again")
    else:
        state, first, records, privacy = skeleton.trainable_state(), 1, [], {}
        save_config(cfg, run_dir)
    round_log = RoundLog(run_dir, records)
    round_log.rewrite()
    check_transport(spec, fed.transport)
    strategy = make_strategy(fed.aggregation, trim_fraction=fed.trim_fraction, server_lr=fed.server_lr,
                             server_momentum=fed.server_momentum, server_tau=fed.server_tau,
                             spec=spec, num_rounds=fed.rounds,
                             local_epochs=fed.local_epochs, lr=fed.lr if fed.lr is not None else cfg.train.lr,
                             max_update_bytes=int(fed.max_update_mb * 2**20), fraction_train=fed.fraction_train,
                             fraction_evaluate=fed.fraction_evaluate, min_train_nodes=1, min_evaluate_nodes=1,
                             # Flower's sampling would wait for ever: the waiting is wait_for_hospitals', bounded
                             min_available_nodes=1, uniform_weights=fed.central_dp.enabled,
                             transport=fed.transport, frozen_digest=skeleton.frozen_digest())
    if fed.aggregation in SERVER_OPTIMIZERS:
        require_float32(spec, f"federation.aggregation={fed.aggregation}", "use fedavg for this model")
    if resumed:   # a server optimizer carries on with its momentum and moments
        strategy.load_optimizer_state(checkpoints.optimizer_state(server_state))
    aggregator = strategy
    if fed.secure_aggregation == "secagg+":
        check_secure_aggregation(spec)
    if fed.central_dp.enabled:
        aggregator = CentralDP(strategy, noise_multiplier=fed.central_dp.noise_multiplier,
                               clipping_norm=fed.central_dp.clipping_norm)
        aggregator.releases = central_releases(records)
    rounds = Rounds(grid, cfg, run_dir, skeleton, spec, checkpoints, round_log, strategy, aggregator,
                    time.perf_counter())
    return rounds, state, first, privacy


def plan(r: Rounds, stage: Stage, server_round: int) -> ConfigRecord:
    """The round's plan, sent to every hospital: the stage (which each checks against its own run
    config), its learning rate, the piece of the schedule this round follows (``lr-from``, ``lr-to``)
    and local epochs, the round count, where a simulation keeps ledgers."""
    lr_from, lr_to = lr_window(r.cfg, stage, server_round)
    return ConfigRecord({"run-dir": str(r.run_dir.resolve()), "stage": stage.name, "lr": float(stage.lr),
                         "lr-from": lr_from, "lr-to": lr_to, "local-epochs": float(stage.local_epochs),
                         "num-rounds": r.cfg.federation.rounds})


def train(r: Rounds, server_round: int, arrays: ArrayRecord,
          config: ConfigRecord) -> tuple[Optional[ArrayRecord], Optional[MetricRecord], RoundReport]:
    """Sample -> train (DP, on site) -> screen -> aggregate: the new global arrays (None: none
    accepted), the aggregated training metrics, and the round's report."""
    fed = r.cfg.federation
    if fed.secure_aggregation == "secagg+":   # the coordinator sees only the mean update
        new_arrays, metrics = secure_train_round(
            r.grid, r.strategy, arrays, server_round=server_round, config=config, spec=r.spec,
            clipping_range=fed.secagg_clipping_range, timeout=fed.timeout_s)
    else:
        messages = r.aggregator.configure_train(server_round, arrays, ConfigRecord(dict(config)), r.grid)
        replies = r.strategy.exchange(r.grid, messages, timeout=fed.timeout_s, server_round=server_round,
                                      phase="train")   # the round goes on without those that did not reply
        accepted = r.strategy.screen(server_round, replies)   # before anything (clipping) touches an update
        new_arrays, metrics = r.aggregator.aggregate_train(server_round, accepted)
    return new_arrays, metrics, r.strategy.report


def evaluate(r: Rounds, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> Optional[MetricRecord]:
    """Federated evaluation of ``arrays`` on the hospitals' validation splits (summed counts); None
    when the run does not evaluate or every hospital is gone."""
    fed = r.cfg.federation
    if fed.fraction_evaluate <= 0:
        return None
    gone = wait_for_hospitals(r.grid, r.strategy.origins.names, min_nodes=1, wait_s=fed.node_wait_s)
    if gone:
        log.warning("round %d: not evaluated: %s", server_round, gone)
        return None
    return r.strategy.aggregate_evaluate(server_round, r.strategy.exchange(
        r.grid, r.strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), r.grid),
        timeout=fed.timeout_s, server_round=server_round, phase="evaluate"))


def checkpoint(r: Rounds, server_round: int, state: dict, record: dict, privacy: dict) -> None:
    """The round's global state, records and privacy block, atomically, before it is logged."""
    r.checkpoints.save(server_round, state, {"config": to_dict(r.cfg), "records": r.log.records + [record],
                                             "privacy": privacy}, optimizer=r.strategy.optimizer_state())


def describe(r: Rounds, privacy: dict, stopped: str) -> dict:
    """The summary so far; the exported adapter's model card is rewritten from it."""
    fed = r.cfg.federation
    trainable = sum(p.numel() for p in r.skeleton.trainable_parameters().values())
    summary = build_summary(r.log.records, privacy, trainable=trainable, dp=r.cfg.privacy.enabled,
                            wall_seconds=time.perf_counter() - r.started, stopped=stopped)
    if fed.central_dp.enabled:
        summary["central_dp"] = central_dp_block(fed.central_dp, r.aggregator.releases)
    summary["run_dir"] = str(r.run_dir)
    write_model_card(r.run_dir, r.cfg, summary, trainable_parts=trainable_parts(r.skeleton))
    return summary


def _tag(record: dict, stage: Stage) -> dict:
    return {"round": record["round"], "stage": stage.name, "task": stage.task, **record}


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Set up (or resume) -> rounds of sample, train, screen, aggregate, evaluate, checkpoint, log ->
    summary. Returns the summary."""
    fed = cfg.federation
    r, state, first, privacy = set_up(grid, cfg, run_dir)
    arrays = _arrays(state)
    stopped = "completed" if first <= fed.rounds else "already complete"
    for server_round in range(first, fed.rounds + 1):
        short = wait_for_hospitals(grid, r.strategy.origins.names, min_nodes=fed.min_nodes, wait_s=fed.node_wait_s)
        if short:
            stopped = f"stopped before round {server_round}: {short}"
            log.error("%s", stopped)
            break
        if not r.log.records and fed.fraction_evaluate > 0:   # round 0: where the federation starts from
            t0, start = time.perf_counter(), stage_at(cfg, 0)
            r.strategy.report = RoundReport()
            evaluation = evaluate(r, 0, arrays, plan(r, start, 0))
            record = _tag(round_record(0, r.strategy.report, None, evaluation, privacy, time.perf_counter() - t0),
                          start)
            checkpoint(r, 0, state, record, privacy)
            r.log.add(record)
            if nobody := nobody_took_part(r.strategy.report, "evaluate"):
                stopped = f"stopped at round 0 (evaluating the start): {nobody}"
                log.error("%s", stopped)
                break
        t0 = time.perf_counter()
        stage = stage_at(cfg, server_round)
        if server_round == stage.first_round and len(stages(cfg)) > 1:
            log.info("stage %s (%s, trains %s): rounds %d-%d", stage.name, stage.task, "+".join(stage.trainable),
                     stage.first_round, stage.last_round)
        config = plan(r, stage, server_round)
        new_arrays, train_metrics, report = train(r, server_round, arrays, config)
        arrays = new_arrays if new_arrays is not None else arrays
        t_train = time.perf_counter() - t0
        evaluation = evaluate(r, server_round, arrays, config)
        privacy = update_privacy(privacy, report, cfg.privacy.delta)
        record = _tag(round_record(server_round, report, train_metrics, evaluation, privacy,
                                   time.perf_counter() - t0), stage)
        record["train_seconds"] = t_train    # sample -> train -> validate -> aggregate (evaluation excluded)
        if fed.central_dp.enabled:
            record["central_dp"] = central_dp_block(fed.central_dp, r.aggregator.releases)
        state = from_wire({k: a.numpy() for k, a in arrays.items()}, r.spec)
        checkpoint(r, server_round, state, record, privacy)
        r.log.add(record)
        describe(r, privacy, f"in progress (round {server_round} of {fed.rounds})")   # a killed run's card too
        if nobody := nobody_took_part(report, "train"):
            stopped = f"stopped after round {server_round}: {nobody}"
            log.error("%s", stopped)
            break
        statuses = [h["status"] for h in report.hospitals.values()]
        if statuses and all(s == "budget-exhausted" for s in statuses) and not report.failed:
            stopped = f"every hospital's privacy budget is spent (after round {server_round})"
            log.warning("no hospital can train any more: %s", stopped)
            break
    summary = describe(r, privacy, stopped)
    write_summary(run_dir, summary)
    return summary


def nobody_took_part(report: RoundReport, phase: str) -> Optional[str]:
    """Why no hospital took part in the round's ``phase`` (train, or round 0's evaluate), when every one
    asked failed (crashed, no reply): the same fault would fail every later round, so the run stops
    there, resumable once it is fixed."""
    failed = [f for f in report.failed if phase in f["phase"].split(", ")]
    answered = (report.evaluation or report.not_evaluated) if phase == "evaluate" else (report.hospitals or
                                                                                      report.rejected)
    if not failed or answered:
        return None
    names = ", ".join(f["hospital"] for f in failed)
    reasons = {f["reason"] for f in failed}
    if len(reasons) == 1:
        return f"every hospital failed to {phase} ({names}): {reasons.pop()}"
    return f"every hospital failed to {phase}: " + "; ".join(f"{f['hospital']}: {f['reason']}" for f in failed)


def wait_for_hospitals(grid: Grid, names: Mapping[int, str], *, min_nodes: int, wait_s: float,
                       poll_s: float = 2.0) -> Optional[str]:
    """Wait at most ``wait_s`` for ``min_nodes`` hospitals to be connected (Flower's own sampling would
    wait for ever). None when they are; else the reason, naming the hospitals seen before that are gone."""
    deadline = time.monotonic() + wait_s
    while len(nodes := set(grid.get_node_ids())) < min_nodes:
        if time.monotonic() >= deadline:
            missing = sorted(f"{name} (node {node})" for node, name in names.items() if node not in nodes)
            return (f"{len(nodes)} of federation.min_nodes={min_nodes} hospitals connected after waiting "
                    f"federation.node_wait_s={wait_s:g} s" + (f"; not connected: {', '.join(missing)}" if missing else ""))
        log.info("waiting for hospitals: %d connected, federation.min_nodes=%d (at most %.0f s more)", len(nodes),
                 min_nodes, max(0.0, deadline - time.monotonic()))
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return None


def trainable_parts(model) -> dict:
    """Tensors and parameters per trainable part (what the model card lists)."""
    parts: dict = {}
    for name, p in model.trainable_parameters().items():
        part = parts.setdefault("fusion" if name.startswith("fusion.") else "lora", {"tensors": 0, "parameters": 0})
        part["tensors"] += 1
        part["parameters"] += p.numel()
    return parts


def resolve_run_dir(cfg: ExperimentConfig, run_config: Mapping) -> Path:
    given = str(run_config.get("run-dir") or "")
    return Path(given).resolve() if given else new_run_dir(cfg.output_dir, "federation").resolve()


def make_app(defaults: Mapping[str, object] = NO_DEFAULTS) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (see client.app.make_app)."""
    defaults = dict(defaults)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_config = {**defaults, **context.run_config}
        cfg = from_run_config(run_config)
        run_federation(grid, cfg, resolve_run_dir(cfg, run_config))

    return server_app


app = make_app()

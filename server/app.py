"""The coordinator's Flower ServerApp: rounds of sample -> train (DP, on site) -> validate ->
FedAvg -> federated evaluation -> checkpoint -> log, resumable from its run folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medvlm.build import build_skeleton
from medvlm.config import ExperimentConfig, Stage, from_run_config, stage_at, stages, to_dict
from medvlm.runs import new_run_dir, save_config
from medvlm.wire import check_transport, from_wire, to_wire
from server.checkpoint import Checkpoints
from server.model_card import write_model_card
from server.report import REPORT_KEYS, RoundLog, build_summary, eval_block, write_summary
from server.secagg import check_secure_aggregation, secure_train_round
from server.strategy import CentralDP, RoundReport, make_strategy

log = logging.getLogger("medvlm.server")
NO_DEFAULTS: Mapping = MappingProxyType({})   # read-only: no run-config fallbacks


def _arrays(state) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in to_wire(state).items()})


def round_record(server_round: int, report: RoundReport, train: Optional[MetricRecord],
                 evaluation: Optional[MetricRecord], privacy: dict, seconds: float) -> dict:
    """One line of metrics.jsonl: aggregate figures only."""
    record: dict = {"round": server_round, "train_loss": float(train["train-loss"]) if train and "train-loss" in train
                    else None}
    record.update(accuracy=None, baseline_accuracy=None)
    if evaluation is not None:
        ev = eval_block(dict(evaluation))
        model, base = ev["model"], ev["baseline"]
        if "accuracy" in model:
            record.update({k: model[k] for k in ("accuracy", "closed_accuracy", "open_accuracy", "open_recall")})
            record.update({f"baseline_{k}": base.get(k) for k in ("accuracy", "closed_accuracy", "open_accuracy")})
            record.update(per_qtype=model["per_qtype"], baseline_per_qtype=base.get("per_qtype"),
                          eval_questions={"closed": model["closed_total"], "open": model["open_total"]})
        if "bleu4" in model:
            record.update({k: model[k] for k in REPORT_KEYS})
            record.update({f"baseline_{k}": base.get(k) for k in REPORT_KEYS})
            record.update(per_finding=model["per_finding"], baseline_per_finding=base.get("per_finding"),
                          eval_reports=model["report_total"])
    record.update({
        "epsilon": {name: p["epsilon"] for name, p in privacy.items()},
        "budget": {name: p.get("budget") for name, p in privacy.items()},
        "examples": {name: h.get("num-examples") for name, h in report.hospitals.items()},
        "hospitals": report.hospitals, "rejected": report.rejected, "failed": report.failed,
        "evaluated_hospitals": sorted(report.evaluation), "evaluation_asked": report.evaluation_asked,
        "bytes_up": sum(h.get("bytes_up", 0) for h in report.hospitals.values()),
        "bytes_down": report.bytes_down, "bytes_down_evaluate": report.bytes_down_evaluate, "seconds": seconds,
    })
    return record


def update_privacy(privacy: dict, report: RoundReport, delta: float) -> dict:
    """Keep each hospital's latest privacy report with its mechanisms as its ledger states them
    (noise multiplier, sample rate, steps per stage): exactly what recomputes its epsilon, whatever
    rounds were resent, lost or resumed."""
    for name, h in report.hospitals.items():
        if "epsilon" not in h:
            continue
        previous = privacy.get(name, {})
        privacy[name] = {
            "epsilon": h["epsilon"], "delta": h.get("delta", delta), "budget": h.get("budget"),
            "noise_multiplier": h.get("noise-multiplier", previous.get("noise_multiplier")),
            "sample_rate": h.get("sample-rate", previous.get("sample_rate")),
            "steps": int(h.get("total-steps", previous.get("steps", 0))),
            "max_grad_norm": h.get("max-grad-norm", previous.get("max_grad_norm")),
            "accountant": h.get("accountant", previous.get("accountant")),
            "mechanisms": h.get("mechanisms", previous.get("mechanisms", [])),
        }
    return privacy


def central_releases(records: list[dict]) -> int:
    """Noisy aggregates released so far (a resumed run keeps counting)."""
    return max([r["central_dp"]["releases"] for r in records if r.get("central_dp")] or [0])


def central_dp_block(cfg, releases: int) -> dict:
    """Client-level (hospital-level) privacy of the released global states: the Gaussian mechanism
    on a clipped equal-weight mean, once per round, every hospital in every round (no sampling
    amplification), composed with the RDP accountant."""
    from medvlm.privacy import epsilon

    if cfg.noise_multiplier == 0:
        eps = None if releases else 0.0    # clipping without noise bounds influence but gives no epsilon
    else:
        eps = epsilon([(cfg.noise_multiplier, 1.0, releases)], delta=cfg.delta)
    return {"level": "hospital", "noise_multiplier": cfg.noise_multiplier, "clipping_norm": cfg.clipping_norm,
            "releases": releases, "sample_rate": 1.0, "delta": cfg.delta, "epsilon": eps, "accountant": "rdp"}


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Set up (or resume) -> rounds -> summary. Returns the summary."""
    started = time.perf_counter()
    fed = cfg.federation
    run_dir.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(cfg.model, seed=fed.seed)    # the LLM's weights are never loaded here
    spec, trainable = skeleton.trainable_spec(), sum(p.numel() for p in skeleton.trainable_parameters().values())
    checkpoints = Checkpoints(run_dir, skeleton)
    resumed = checkpoints.load(cfg)
    if resumed:
        server_state, state = resumed
        first, records, privacy = server_state["round"] + 1, server_state["records"], server_state["privacy"]
        log.info("resuming %s after round %d", run_dir, first - 1)
    else:
        state, first, records, privacy = skeleton.trainable_state(), 1, [], {}
        save_config(cfg, run_dir)
    rounds = RoundLog(run_dir, records)
    rounds.rewrite()
    check_transport(spec, fed.transport)
    strategy = make_strategy(fed.aggregation, trim_fraction=fed.trim_fraction, spec=spec, num_rounds=fed.rounds,
                             local_epochs=fed.local_epochs, lr=fed.lr if fed.lr is not None else cfg.train.lr,
                             max_update_bytes=int(fed.max_update_mb * 2**20), fraction_train=fed.fraction_train,
                             fraction_evaluate=fed.fraction_evaluate, min_train_nodes=1, min_evaluate_nodes=1,
                             # Flower's sampling would wait for ever: the waiting is wait_for_hospitals', bounded
                             min_available_nodes=1, uniform_weights=fed.central_dp.enabled,
                             transport=fed.transport, frozen_digest=skeleton.frozen_digest())
    aggregator = strategy
    if fed.secure_aggregation == "secagg+":
        check_secure_aggregation(spec)
    if fed.central_dp.enabled:
        aggregator = CentralDP(strategy, noise_multiplier=fed.central_dp.noise_multiplier,
                               clipping_norm=fed.central_dp.clipping_norm)
        aggregator.releases = central_releases(records)
    arrays = _arrays(state)
    base_config = ConfigRecord({"run-dir": str(run_dir.resolve())})
    parts = trainable_parts(skeleton)

    def describe(stopped: str) -> dict:
        """The summary so far; the exported adapter's model card is rewritten from it."""
        summary = build_summary(rounds.records, privacy, trainable=trainable, dp=cfg.privacy.enabled,
                                wall_seconds=time.perf_counter() - started, stopped=stopped)
        if fed.central_dp.enabled:
            summary["central_dp"] = central_dp_block(fed.central_dp, aggregator.releases)
        summary["run_dir"] = str(run_dir)
        write_model_card(run_dir, cfg, summary, trainable_parts=parts)
        return summary

    stopped = "completed" if first <= fed.rounds else "already complete"
    def stage_config(stage: Stage) -> ConfigRecord:
        """The round's stage: its plan goes to the strategy, its name to every hospital (which checks it)."""
        strategy.lr, strategy.local_epochs = stage.lr, stage.local_epochs
        return ConfigRecord({**dict(base_config), "stage": stage.name})

    def tag(record: dict, stage: Stage) -> dict:
        return {"round": record["round"], "stage": stage.name, "task": stage.task, **record}

    def evaluate_start() -> None:   # round 0: where the federation starts from
        t0 = time.perf_counter()
        strategy.report = RoundReport()
        evaluation = strategy.aggregate_evaluate(0, strategy.exchange(
            grid, strategy.configure_evaluate(0, arrays, stage_config(stage_at(cfg, 0)), grid), timeout=fed.timeout_s,
            server_round=0, phase="evaluate"))
        record = tag(round_record(0, strategy.report, None, evaluation, privacy, time.perf_counter() - t0),
                     stage_at(cfg, 0))
        checkpoints.save(0, state, {"config": to_dict(cfg), "records": rounds.records + [record], "privacy": privacy})
        rounds.add(record)

    for server_round in range(first, fed.rounds + 1):
        short = wait_for_hospitals(grid, strategy.origins.names, min_nodes=fed.min_nodes, wait_s=fed.node_wait_s)
        if short:
            stopped = f"stopped before round {server_round}: {short}"
            log.error("%s", stopped)
            break
        if not rounds.records and fed.fraction_evaluate > 0:
            evaluate_start()
        t0 = time.perf_counter()
        stage = stage_at(cfg, server_round)
        if server_round == stage.first_round and len(stages(cfg)) > 1:
            log.info("stage %s (%s, trains %s): rounds %d-%d", stage.name, stage.task, "+".join(stage.trainable),
                     stage.first_round, stage.last_round)
        round_config = stage_config(stage)
        if fed.secure_aggregation == "secagg+":   # the coordinator sees only the mean update
            new_arrays, train_metrics = secure_train_round(
                grid, strategy, arrays, server_round=server_round, config=round_config, spec=spec,
                clipping_range=fed.secagg_clipping_range, timeout=fed.timeout_s)
        else:
            messages = aggregator.configure_train(server_round, arrays, ConfigRecord(dict(round_config)), grid)
            replies = strategy.exchange(grid, messages, timeout=fed.timeout_s, server_round=server_round,
                                        phase="train")   # the round goes on without those that did not reply
            accepted = strategy.screen(server_round, replies)   # before anything (clipping) touches an update
            new_arrays, train_metrics = aggregator.aggregate_train(server_round, accepted)
        report = strategy.report
        if new_arrays is not None:
            arrays = new_arrays
        evaluation, t_train = None, time.perf_counter() - t0
        gone = wait_for_hospitals(grid, strategy.origins.names, min_nodes=1, wait_s=fed.node_wait_s) \
            if fed.fraction_evaluate > 0 else None
        if gone:
            log.warning("round %d: not evaluated: %s", server_round, gone)
        elif fed.fraction_evaluate > 0:
            evaluation = strategy.aggregate_evaluate(server_round, strategy.exchange(
                grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(round_config)), grid),
                timeout=fed.timeout_s, server_round=server_round, phase="evaluate"))
        privacy = update_privacy(privacy, report, cfg.privacy.delta)
        record = tag(round_record(server_round, report, train_metrics, evaluation, privacy,
                                  time.perf_counter() - t0), stage)
        record["train_seconds"] = t_train    # sample -> train -> validate -> aggregate (evaluation excluded)
        if fed.central_dp.enabled:
            record["central_dp"] = central_dp_block(fed.central_dp, aggregator.releases)
        state = from_wire({k: a.numpy() for k, a in arrays.items()}, spec)
        checkpoints.save(server_round, state, {"config": to_dict(cfg), "records": rounds.records + [record],
                                               "privacy": privacy})
        rounds.add(record)
        describe(f"in progress (round {server_round} of {fed.rounds})")   # a killed run's global/ has a card too
        statuses = [h["status"] for h in report.hospitals.values()]
        if statuses and all(s == "budget-exhausted" for s in statuses) and not report.failed:
            stopped = f"every hospital's privacy budget is spent (after round {server_round})"
            log.warning("no hospital can train any more: %s", stopped)
            break
    summary = describe(stopped)
    write_summary(run_dir, summary)
    return summary


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

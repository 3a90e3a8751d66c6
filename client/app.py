"""The hospital's Flower ClientApp: receive the global trainable state, train it with DP-SGD on
local data (charging the on-site ledger), or evaluate it, and reply through the egress guard."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace

from types import MappingProxyType
from typing import Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import rounds
from client.egress import as_secure_fit_reply, reply_content
from client.ledger import Ledger, exclusive
from client.rounds import request_key
from client.site import SiteCache
from medvlm.metrics import baseline_for, counts_for, load_labeler
from medvlm.privacy import PrivacyBudgetExceeded
from medvlm.wire import TRANSPORTS, decode, legacy_order, unpack

log = logging.getLogger("medvlm.client")
NO_DEFAULTS: Mapping = MappingProxyType({})   # read-only: no run-config fallbacks

SECURE_ARRAYS, SECURE_CONFIG = "fitins.parameters", "fitins.config"   # SecAgg+ rounds (legacy form)
# This process' sites, models and parsed run configs, built once and reused by every message it serves
SITES = SiteCache()


def _received(msg: Message) -> tuple[dict, ConfigRecord]:
    """The global state (wire form) and round config, from a plain or a SecAgg+ train message."""
    if SECURE_ARRAYS in msg.content.array_records:
        return dict(enumerate(a.numpy() for a in msg.content.array_records[SECURE_ARRAYS].values())), \
            msg.content.config_records[SECURE_CONFIG]
    return {name: arr.numpy() for name, arr in msg.content["arrays"].items()}, msg.content["config"]


def _load_global(site, msg: Message) -> tuple[dict, dict, str]:
    """Decode the global state the coordinator sent (in the transport it names), check that FFA-LoRA's
    frozen matrices match the coordinator's, load it. Returns (wire arrays, decoded state, transport)."""
    arrays, config = _received(msg)
    transport = str(config.get("transport", "fp32"))
    if transport not in TRANSPORTS:
        raise ValueError(f"the coordinator sent the state in transport {transport!r}; this client knows "
                         f"{list(TRANSPORTS)}: update medvlm-fl on this site")
    digest, ours = config.get("frozen-digest"), site.model.frozen_digest()
    if digest != ours:
        raise ValueError(f"FFA-LoRA: this hospital's frozen LoRA A matrices (digest {ours}) differ from the "
                         f"coordinator's ({digest}); both must use the same model.lora.ffa, model.init and "
                         "federation.seed, or averaging B would not average the adapters")
    if all(isinstance(k, int) for k in arrays):     # legacy Parameters: names by the shared order
        order = legacy_order(site.spec)
        if len(arrays) != len(order):
            raise ValueError(f"SecAgg+ round sent {len(arrays)} tensors; this model has {len(order)}")
        arrays = {order[i]: a for i, a in arrays.items()}
    else:
        arrays = unpack(arrays)
    state = decode(arrays, site.spec, transport)
    site.model.load_trainable_state(state)
    return arrays, state, transport


def _site(msg: Message, context: Context, defaults: Mapping):
    """This hospital's site for the message's round: the curriculum stage follows from the run config
    and the server round on both ends; a coordinator that names another stage is refused."""
    run_config = {**defaults, **context.run_config}
    _, config = _received(msg)
    if "run-dir" in config:  # simulation: hospitals' ledgers live in the run folder
        run_config["run-dir"] = str(config["run-dir"])
    site = SITES.site(run_config, context.node_config, int(config.get("server-round", 0)))
    if "stage" in config and str(config["stage"]) != site.stage.name:
        raise ValueError(f"round {config.get('server-round')}: the coordinator runs stage {config['stage']!r} but "
                         f"this hospital's run config puts the round in stage {site.stage.name!r}: both must use the "
                         "same federation.stages")
    return site


def train(msg: Message, context: Context, defaults: Mapping = NO_DEFAULTS) -> Message:
    """Load the global state, check the ledger, run DP-SGD for the round, charge the ledger, reply."""
    site = _site(msg, context, defaults)
    cfg, (_, round_cfg) = site.cfg, _received(msg)
    server_round, num_rounds = int(round_cfg["server-round"]), int(round_cfg["num-rounds"])
    train_cfg = replace(cfg.train, epochs=float(round_cfg["local-epochs"]), lr=float(round_cfg["lr"]),
                        trainable=list(site.stage.trainable))
    sent, received, transport = _load_global(site, msg)
    reply = _train(site, cfg, train_cfg, server_round, num_rounds, transport=transport, received=received,
                   key=request_key(sent, round_cfg), lr_window=_lr_window(round_cfg))
    if SECURE_ARRAYS in msg.content.array_records:   # SecAgg+: secaggplus_mod masks this reply
        reply = as_secure_fit_reply(reply, sent=sent, spec=site.spec)
    return Message(reply, reply_to=msg)


def _lr_window(round_cfg: Mapping) -> tuple[float, float]:
    """The piece of the learning-rate schedule the round's plan asks for (the whole curve when the
    plan does not say: a coordinator from before ``lr-from`` / ``lr-to``). It shapes the steps, never
    their number or noise, so it cannot change what a round spends."""
    from medvlm.train import lr_factor

    window = float(round_cfg.get("lr-from", 0.0)), float(round_cfg.get("lr-to", 1.0))
    try:
        lr_factor(1, window)   # the one check of a window
    except ValueError as err:
        raise ValueError(f"the round's plan asks for lr-from={window[0]}, lr-to={window[1]}: need "
                         "0 <= lr-from < lr-to <= 1 (the coordinator's federation.lr_schedule)") from err
    return window


def _ledger_metrics(ledger: Ledger) -> dict[str, float]:
    return {"epsilon": ledger.epsilon, "delta": ledger.delta, "budget": ledger.budget,
            "noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate,
            "total_steps": ledger.total_steps, "max_grad_norm": ledger.max_grad_norm}


def _train(site, cfg, train_cfg, server_round: int, num_rounds: int, **kw) -> RecordDict:
    """One round at this hospital; under DP it holds the ledger (``client.ledger.exclusive``) from reading
    what is spent to writing the charge, so tasks of concurrent runs charge one after the other."""
    with exclusive(site.state_dir) if cfg.privacy.enabled else contextlib.nullcontext():
        return _train_round(site, cfg, train_cfg, server_round, num_rounds, **kw)


def _train_round(site, cfg, train_cfg, server_round: int, num_rounds: int, *, transport: str = "fp32",
                 received: Mapping | None = None, key: str | None = None,
                 lr_window: tuple[float, float] = (0.0, 1.0)) -> RecordDict:
    from medvlm.train import dp_records, planned_steps, train_local

    metrics: dict[str, float] = {"num-examples": len(site.train)}
    privacy = cfg.privacy
    tags = site.stage.task == "tags"
    ledger = None
    if privacy.enabled:
        ledger = Ledger.open(site.state_dir, hospital=site.name, budget=site.budget, delta=site.delta,
                             accountant=privacy.accountant, max_grad_norm=privacy.max_grad_norm,
                             must_exist=site.deployed)
        again = rounds.kept(site.state_dir, ledger, server_round, key) if key else None
        if again is not None:   # the coordinator lost our reply (a crash): the same update, nothing spent
            state, kept_metrics = again
            note = (f"round {server_round} was trained and charged for this same global state before; its kept "
                    "update is sent again and no privacy is spent")
            log.info("%s: %s", site.name, note)
            metrics.update(kept_metrics)
            metrics.update(_ledger_metrics(ledger))
            return reply_content(kind="train", metrics=metrics, spec=site.spec, state=state, status=_status(
                site, "trained", ledger, accountant=privacy.accountant, resent=note), transport=transport,
                reference=received)
        sample_rate, steps = planned_steps(dp_records(site.train, tags=tags), train_cfg)
        try:
            sigma = ledger.plan_for(site.stage, server_round=server_round, num_rounds=num_rounds,
                                    planned_rounds=cfg.federation.rounds, sample_rate=sample_rate,
                                    steps_per_round=steps, min_noise=site.policy.min_noise)
        except PrivacyBudgetExceeded as err:
            log.warning("%s", err)
            ledger.save(site.state_dir)
            metrics.update(epsilon=ledger.epsilon, budget=ledger.budget, delta=ledger.delta)
            return reply_content(kind="train", metrics=metrics, spec=site.spec, status=_status(
                site, "budget-exhausted", ledger, reason=str(err)))
        privacy = replace(privacy, target_epsilon=None, noise_multiplier=sigma, delta=site.delta)

    head = _tag_head(site, cfg) if tags else None
    result = train_local(site.model, site.train, train=train_cfg, privacy=privacy,
                         accountant_state=({"mechanism": ledger.accountant, "history": ledger.history}
                                           if ledger else None), progress=False, canaries=site.canaries,
                         lr_window=lr_window, tags=head)
    metrics.update({k: result.metrics[k] for k in rounds.KEPT_METRICS})   # same names on the wire as here
    if ledger is not None:
        if key:   # kept first, then charged: an update the ledger never charged is never sent again
            rounds.keep(site.state_dir, server_round, key, result.state, metrics)
        ledger.record(history=result.accountant_state["history"], server_round=server_round, key=key)
        ledger.save(site.state_dir)  # charged before anything is released
        metrics.update(_ledger_metrics(ledger))
    if head is not None and not head.fixed:
        # the hospital's own, kept in its state dir and never in a reply. Saved only once the round is
        # charged: a head trained in a round that a crash left uncharged would carry uncharged steps
        # into every later (released) fusion update
        from medvlm.tags import save_head

        save_head(head, site.state_dir)
    return reply_content(kind="train", metrics=metrics, spec=site.spec, state=result.state, status=_status(
        site, "trained", ledger, accountant=privacy.accountant if ledger else "none"), transport=transport,
        reference=received)


def _tag_head(site, cfg):
    """This hospital's stage-1 tag head (``medvlm.tags``): from its state directory, or a fresh one."""
    from medvlm.tags import fusion_width, load_head

    return load_head(site.state_dir, fusion_width(site.model.fusion, site.train.pixels), seed=cfg.train.seed,
                     loss=site.stage.tag_loss, fixed=site.stage.tag_head == "fixed")


def _status(site, status: str, ledger: Ledger | None = None, **extra: str) -> dict[str, str]:
    """A reply's status line; it says plainly when the site trained at its own privacy settings rather
    than the run's proposal, and carries the ledger's mechanisms (σ, q, steps per stage: what anyone
    recomputes the site's epsilon from)."""
    out = {"hospital": site.name, "status": status, **extra}
    if ledger is not None and ledger.history:
        out["ledger"] = json.dumps(ledger.mechanisms(), separators=(",", ":"))
    if site.policy_notes:
        out["privacy"] = f"this site's policy applied: {site.policy.describe()}; not applied: " + \
            "; ".join(site.policy_notes)
        out["privacy"] = out["privacy"][:500]
    return out


def evaluate(msg: Message, context: Context, defaults: Mapping = NO_DEFAULTS) -> Message:
    """Score the global state on the local validation split (the round's stage's task); reply with
    counts only (VQA correct/total, or report BLEU / ROUGE-L / finding statistics). A site whose
    policy says ``evaluate = "off"`` scores nothing and replies why."""
    from medvlm.evaluate import predict

    site = _site(msg, context, defaults)
    if site.policy.evaluate == "off":   # checked before the state is even loaded: nothing is scored
        reason = (f"this site does not score coordinator-sent states on its validation data (its policy: "
                  f"evaluate=off, {site.policy.source})")
        log.info("%s: round %s: evaluation refused: %s", site.name, _received(msg)[1].get("server-round"), reason)
        return Message(reply_content(kind="evaluate", metrics={}, spec=site.spec, status={
            "hospital": site.name, "status": "not-evaluated", "reason": reason}), reply_to=msg)
    _load_global(site, msg)
    started = time.perf_counter()
    labeler = load_labeler(site.cfg.data.labeler)
    predictions = predict(site.model, site.val, max_new_tokens=site.cfg.train.eval_max_new_tokens)
    counts = counts_for(predictions, site.val.rows, labeler)
    baseline = counts_for(baseline_for(site.train.rows, site.val.rows), site.val.rows, labeler)
    metrics = {**counts, **{f"baseline/{k}": v for k, v in baseline.items()},
               "num-examples": len(site.val), "seconds": time.perf_counter() - started}
    return Message(reply_content(kind="evaluate", metrics=metrics, spec=site.spec,
                                 status={"hospital": site.name, "status": "evaluated"}), reply_to=msg)


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its config
    record); every other message passes untouched (the mod would reject it)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, call_next)


def make_app(defaults: Mapping[str, object] = NO_DEFAULTS) -> ClientApp:
    """A ClientApp whose run config falls back to ``defaults`` (``medvlm-fl simulate`` passes the
    preset, overrides and run folder this way; ``flwr run`` passes them as the run config)."""
    defaults = dict(defaults)
    client_app = ClientApp()

    @client_app.train(mods=[secure_aggregation_mod])
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, defaults)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, defaults)

    return client_app


app = make_app()

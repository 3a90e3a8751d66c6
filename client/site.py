"""A hospital site: who it is, where its data and ledger live, and its model — from its node config.

Node config keys (``flower-supernode --node-config '...'``; strings quoted):

    hospital   = "st-mary"            name used in logs and the ledger (simulation: a profile name)
    data-path  = "/data/vqa"          a data folder or manifest (any format of data.format); without
                                      it, the run's synthetic profile
    data-path-<stage> = "/data/reports"  optional: another folder for one curriculum stage
                                      (federation.stages); the stage's task picks the rows
    data-format = "slake"             optional: the folder's format (default data.format, auto)
    on-bad-row = "skip"               optional: train without the rows the data check rejects (listed
                                      in the log); default "error": refuse. The site's choice, never the run's
    state-dir  = "/var/lib/medvlm"    where the privacy ledger persists (must survive restarts)
    device     = "cuda:0"             overrides train.device
    dp, epsilon, delta, max-grad-norm, accountant, min-noise, evaluate
                                      the hospital's privacy policy (client/policy.py): in a
                                      deployment the run config's privacy.* is never applied
    labeler    = "synthetic"          the report finding labeler (deployment: never data.labeler)
    audit-canaries = "/audit/canaries.json"
                                      optional: gradient canaries (``medvlm-fl audit``) that join this
                                      site's DP-SGD steps, to check its privacy from outside; the site's
                                      choice only (a run config cannot add them)

In a simulation Flower injects ``partition-id``; hospital ``i`` is then profile ``data.hospitals[i]``
and its state lives in ``<run-dir>/hospitals/<name>``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

from client.policy import SitePolicy
from medvlm.audit import GradientCanaries
from medvlm.build import build_medvlm
from medvlm.config import ExperimentConfig, Stage, for_stage, from_run_config, stage_at
from medvlm.data.dataset import VQARows, load_splits
from medvlm.features import cached_encoder, with_frozen_features
from medvlm.model.vlm import MedVLM
from medvlm.tensors import TensorSpec

log = logging.getLogger("medvlm.client")


@dataclass
class Site:
    name: str
    cfg: ExperimentConfig
    state_dir: Path
    budget: float
    delta: float
    model: MedVLM
    spec: dict[str, TensorSpec]
    train: VQARows            # frozen patch tokens, encoded once per process
    val: VQARows
    stage: Stage              # the curriculum stage this site's data and trainable parts are for
    policy: SitePolicy        # the site's own privacy settings (cfg.privacy follows them)
    policy_notes: tuple[str, ...] = ()   # proposed privacy settings the site did not apply
    deployed: bool = False    # a real hospital (node config names it), not a simulated profile
    canaries: Optional[GradientCanaries] = None   # an audit's gradient canaries (node config only)


def _hospital_identity(cfg: ExperimentConfig, node_config: Mapping, run_config: Mapping) -> tuple[str, Path]:
    if "hospital" in node_config:
        name = str(node_config["hospital"])
    elif "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if cfg.data.source != "synthetic":
            raise ValueError("node config has a partition-id but data.source is a manifest: give each hospital "
                             "its own data-path and hospital name in its node config")
        if not 0 <= pid < len(cfg.data.hospitals):
            raise ValueError(f"partition-id {pid} but data.hospitals has {len(cfg.data.hospitals)} profiles "
                             f"{cfg.data.hospitals}: run as many supernodes as hospitals")
        nodes = node_config.get("num-partitions")     # Flower's simulation says how many SuperNodes it runs
        if nodes is not None and int(nodes) != len(cfg.data.hospitals):
            left = "some would never take part" if int(nodes) < len(cfg.data.hospitals) else "some nodes have none"
            raise ValueError(f"the simulation runs {int(nodes)} SuperNodes but data.hospitals has "
                             f"{len(cfg.data.hospitals)} profiles {cfg.data.hospitals}, so {left}: "
                             f"run one per hospital (flwr run . --federation-config "
                             f"\"num-supernodes={len(cfg.data.hospitals)}\")")
        name = cfg.data.hospitals[pid]
    else:
        raise ValueError("node config names no hospital: set hospital=\"<name>\" (and data-path, state-dir)")
    if "state-dir" in node_config:
        state_dir = Path(str(node_config["state-dir"]))
    elif run_config.get("run-dir") and "partition-id" in node_config:  # simulation only
        state_dir = Path(str(run_config["run-dir"])) / "hospitals" / name
    else:
        raise ValueError(f"hospital {name}: node config has no state-dir for its privacy ledger; set "
                         "state-dir=\"/path/that/survives/restarts\"")
    return name, state_dir


def build_site(run_config: Mapping, node_config: Mapping, stage: Optional[Stage] = None, *,
               sites: Optional["SiteCache"] = None) -> Site:
    """Read config -> identify the hospital -> load its data for the stage's task (default: the
    first stage's) -> build the model (frozen features). ``sites``: where the parsed config and
    the model come from when a process serves many messages (a fresh one otherwise)."""
    sites = sites if sites is not None else SiteCache()
    cfg = sites.config(run_config)
    stage = stage or stage_at(cfg, 0)
    name, state_dir = _hospital_identity(cfg, node_config, run_config)
    cfg = for_stage(cfg, stage)
    if "device" in node_config:
        cfg = replace(cfg, train=replace(cfg.train, device=str(node_config["device"])))
    site_notes = []
    if "hospital" in node_config:
        # a deployed site's finding labeler is its own: it turns the site's reports into the names of the
        # counts it sends (a coordinator's "shlex:split" would send a count for every word of every report)
        labeler = str(node_config.get("labeler", "synthetic"))
        if cfg.data.labeler != labeler:
            site_notes.append(f"data.labeler={cfg.data.labeler} proposed, {labeler} applied")
        cfg = replace(cfg, data=replace(cfg.data, labeler=labeler))
    data_cfg = cfg.data
    path = node_config.get(f"data-path-{stage.name}", node_config.get("data-path"))
    if path is not None:
        on_bad_row = str(node_config.get("on-bad-row", "error"))
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"node config on-bad-row={on_bad_row!r}: use error or skip")
        # a site's own folder is never dealt out: data.partition is the synthetic simulation's
        data_cfg = replace(cfg.data, source=str(path), format=str(node_config.get("data-format", cfg.data.format)),
                           on_bad_row=on_bad_row, partition="own")
    elif cfg.data.source == "synthetic" and name not in cfg.data.hospitals:
        raise ValueError(f"hospital {name!r} has no data-path and is not a synthetic profile in data.hospitals "
                         f"{cfg.data.hospitals}")
    policy = SitePolicy.for_site(node_config, cfg.privacy)
    privacy, notes = policy.govern(cfg.privacy)
    notes += site_notes
    cfg = replace(cfg, privacy=privacy)
    if notes:
        log.warning("hospital %s trains at its own privacy settings (%s); the run's proposal was not applied: %s",
                    name, policy.describe(), "; ".join(notes))

    model = sites.model(cfg)
    # a hospital's own images: frozen features cached in its state directory, never sent anywhere
    cache = state_dir / "features" if data_cfg.source != "synthetic" else None
    try:
        splits = load_splits(data_cfg, model.vision.preprocess,
                             hospitals=[name] if data_cfg.source == "synthetic" else None,
                             encode_files=cached_encoder(model, cache, data_cfg), only=("train", "val"))
    except (ValueError, OSError) as err:
        if "hospital" not in node_config:     # a simulation: the researcher's own synthetic data, said in full
            raise
        raise _unread(name, err) from err     # Flower sends str() of what a ClientApp raised, never its cause
    train = with_frozen_features(model, splits["train"])
    val = with_frozen_features(model, splits["val"])
    log.info("hospital %s, stage %s (%s): %d train / %d val rows, ledger in %s", name, stage.name, stage.task,
             len(train), len(val), state_dir)
    return Site(name, cfg, state_dir, policy.epsilon or 0.0, policy.delta, model, model.trainable_spec(), train, val,
                stage, policy, tuple(notes), deployed="hospital" in node_config, canaries=_canaries(name, node_config))


def _unread(name: str, err: Exception) -> SiteDataError:
    """What a deployed hospital whose data cannot be read tells the coordinator: the kind of fault and how many
    rows, never the files, paths or rows themselves (an exception's message leaves in Flower's error reply, and a
    path can name a patient: MIMIC-CXR's p10000032/s50414267); those go to the hospital's own log."""
    log.error("hospital %s: its data could not be read: %s", name, err)
    problems = getattr(err, "problems", None)
    kind = f"{len(problems)} bad row(s)" if problems else type(err).__name__
    return SiteDataError(f"hospital {name}: its data could not be read ({kind}); the files and rows at fault are "
                         "named in the hospital's own log, not sent: its IT runs medvlm-fl check-data on its "
                         "data-path")


class SiteDataError(RuntimeError):
    """A deployed hospital's data could not be read; the details stay at the hospital."""


def _canaries(name: str, node_config: Mapping) -> Optional[GradientCanaries]:
    if "audit-canaries" not in node_config:
        return None
    path = Path(str(node_config["audit-canaries"]))
    try:
        canaries = GradientCanaries.from_json(json.loads(path.read_text()), source=str(path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"hospital {name}: node config audit-canaries={str(path)!r} cannot be read ({err}); "
                         "write it with medvlm-fl audit or remove the key") from err
    log.warning("hospital %s trains with %d audit canaries (%d included) from %s: its updates carry them; "
                "audit runs only, never a federation whose model is used", name, len(canaries),
                int(canaries.included.sum()), path)
    return canaries


class _Bounded(OrderedDict):
    """At most ``size`` entries; the oldest goes first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key: str, make):
        if key not in self:
            while len(self) >= self.size:
                self.popitem(last=False)
            self[key] = make()
        return self[key]


class SiteCache:
    """What a process builds once and reuses across the messages it serves: the parsed run config
    (a 100-hospital list takes a while to merge), one model per (model config, seed, device), and the
    sites (data loading and image encoding happen once, not every round). A simulation's workers
    serve several hospitals each, so the sites are bounded; the ClientApp owns one
    (``client.app.SITES``), a test makes its own."""

    def __init__(self, max_sites: int = 8) -> None:
        self._configs = _Bounded(1)
        self._models = _Bounded(1)
        self._sites = _Bounded(max_sites)

    def config(self, run_config: Mapping) -> ExperimentConfig:
        return self._configs.get_or_make(json.dumps(dict(run_config), sort_keys=True, default=str),
                                         lambda: from_run_config(run_config))

    def model(self, cfg: ExperimentConfig) -> MedVLM:
        """Shared by the hospitals a worker serves: every message loads the global trainable state
        into it before use, and the frozen parts are the same for all of them."""
        from medvlm.train import resolve_device

        key = repr((cfg.model, cfg.federation.seed, cfg.train.device))   # dataclass reprs: every field
        return self._models.get_or_make(key, lambda: build_medvlm(cfg.model, seed=cfg.federation.seed).to(
            resolve_device(cfg.train.device)))

    def site(self, run_config: Mapping, node_config: Mapping, server_round: int = 0) -> Site:
        """One site per (run config, node config, curriculum stage)."""
        stage = stage_at(self.config(run_config), server_round)
        key = json.dumps([dict(run_config), dict(node_config), stage.name], sort_keys=True, default=str)
        return self._sites.get_or_make(key, lambda: build_site(run_config, node_config, stage, sites=self))

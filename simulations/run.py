"""Local federations for researchers: N synthetic non-IID hospitals on one machine, through
Flower's simulation engine (Ray), with the same ServerApp and ClientApp a deployment runs."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Optional, Sequence

from medvlm.config import load_config

log = logging.getLogger("medvlm")


def simulate(preset: str = "tiny", overrides: Sequence[str] = (), *, run_dir: Optional[str | Path] = None,
             cpus_per_hospital: float = 1.0, gpus_per_hospital: float = 0.0) -> dict:
    """Run (or resume, if ``run_dir`` holds a checkpoint) a simulated federation; returns summary.json."""
    from flwr.simulation import run_simulation

    from client.app import make_app as make_client_app
    from medvlm.quiet import SIMULATION, quiet, without_log
    from medvlm.runs import new_run_dir
    from server.app import make_app as make_server_app

    cfg = load_config(preset, list(overrides))  # fail fast, before Ray starts, on a bad config
    if run_dir and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file: give a folder (a new one, or a run's to resume it)")
    if cfg.data.source != "synthetic":
        raise ValueError("simulate runs synthetic hospitals (data.source=synthetic); a manifest belongs to one "
                         "hospital: deploy it with a SuperNode and node config data-path")
    from medvlm.data.dataset import check_synthetic

    check_synthetic(cfg.data, cfg.federation.stages)   # before Ray starts: a typo would crash every hospital
    # build the built-in models (and the public stage-1/2 state) once, here, before the hospitals
    # start: otherwise every simulated hospital would build them at the same time
    from medvlm.build import build_skeleton

    build_skeleton(cfg.model, seed=cfg.federation.seed)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, "federation")
    run_dir = run_dir.resolve()
    defaults = {"preset": preset, "overrides": shlex.join(overrides), "run-dir": str(run_dir)}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False   # Flower has its own console handler
    # we run the apps in-process on purpose; `flwr run` is what deployments use
    with without_log("flwr", "DEPRECATED FEATURE: The `run_simulation` function"), quiet(SIMULATION):
        run_simulation(server_app=make_server_app(defaults), client_app=make_client_app(defaults),
                       num_supernodes=len(cfg.data.hospitals),
                       backend_config={"client_resources": {"num_cpus": cpus_per_hospital,
                                                            "num_gpus": gpus_per_hospital}})
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the federation in {run_dir} ended without a summary.json; see the log above "
                           "(checkpoints up to the last completed round are kept: run again to resume)")
    return json.loads(summary_path.read_text())


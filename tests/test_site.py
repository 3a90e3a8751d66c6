"""client/site.py on its own: who a node is, from its node config alone, and one site per process
per (run config, node config, stage)."""

import shlex

import pytest

from client.site import SiteCache, _hospital_identity
from medvlm.config import load_config
from tests.conftest import TINY_OVERRIDES

RUN = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES)}


def test_a_node_is_named_by_its_node_config_and_a_missing_piece_is_named():
    cfg = load_config("tiny", TINY_OVERRIDES)
    name, state = _hospital_identity(cfg, {"hospital": "st-mary", "state-dir": "/var/lib/m"}, {})
    assert (name, str(state)) == ("st-mary", "/var/lib/m")
    name, state = _hospital_identity(cfg, {"partition-id": 1}, {"run-dir": "/runs/r"})
    assert name == cfg.data.hospitals[1] and str(state) == f"/runs/r/hospitals/{name}"    # a simulation
    with pytest.raises(ValueError, match="names no hospital"):
        _hospital_identity(cfg, {}, {})
    with pytest.raises(ValueError, match=r"partition-id 7 but data.hospitals has 3 profiles"):
        _hospital_identity(cfg, {"partition-id": 7}, {"run-dir": "/runs/r"})
    with pytest.raises(ValueError, match="st-mary: node config has no state-dir"):
        _hospital_identity(cfg, {"hospital": "st-mary"}, {})
    # flwr run . with num-supernodes other than the number of profiles: fewer left hospitals out unsaid
    name, _ = _hospital_identity(cfg, {"partition-id": 0, "num-partitions": 3}, {"run-dir": "/runs/r"})
    assert name == cfg.data.hospitals[0]
    for nodes, why in ((2, "some would never take part"), (5, "some nodes have none")):
        with pytest.raises(ValueError, match=rf"runs {nodes} SuperNodes but data.hospitals has 3 profiles.*{why}.*"
                                             r"num-supernodes=3"):
            _hospital_identity(cfg, {"partition-id": 0, "num-partitions": nodes}, {"run-dir": "/runs/r"})


def test_one_site_per_run_node_and_stage_in_a_process(tmp_path):
    node = {"partition-id": 0}
    run = {**RUN, "run-dir": str(tmp_path)}
    sites = SiteCache()
    site = sites.site(run, node, server_round=1)
    assert sites.site(run, node, server_round=2) is site                # the same stage: built once
    assert site.name == "general" and site.state_dir == tmp_path / "hospitals" / "general"
    assert len(site.train) > 0 and site.train.tokens and site.train.pixels.dim() == 3   # patch tokens, once
    other = sites.site(run, {"partition-id": 1}, server_round=1)
    assert other is not site and other.name == "oncology"
    assert other.model is site.model                                     # one model shared by the hospitals
    assert SiteCache().site(run, node, server_round=1) is not site       # a cache of its own builds its own


def test_the_site_cache_is_bounded_and_drops_the_oldest(tmp_path):
    sites = SiteCache(max_sites=2)
    run = {**RUN, "run-dir": str(tmp_path)}
    first = sites.site(run, {"partition-id": 0})
    sites.site(run, {"partition-id": 1})
    sites.site(run, {"partition-id": 2})                                 # the oldest (general) goes
    assert len(sites._sites) == 2 and sites.site(run, {"partition-id": 0}) is not first


def test_a_deployed_site_whose_data_cannot_be_read_names_no_file_or_row_to_the_coordinator(tmp_path, caplog):
    """An exception's message leaves in Flower's error reply, and a path can name a patient (MIMIC-CXR's
    p10000032/s50414267): the coordinator hears the kind of fault and how many rows; the hospital's log, all."""
    import json

    from client.site import SiteDataError, build_site

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "manifest.jsonl").write_text(json.dumps({
        "image": "files/p10/p10000032/s50414267/view1.jpg", "question": "is there an effusion?", "answer": "yes",
        "answer_type": "closed"}) + "\n")
    node = {"hospital": "st-mary", "data-path": str(folder), "state-dir": str(tmp_path / "state"), "epsilon": 8.0}
    with caplog.at_level("ERROR", logger="client.site"), pytest.raises(SiteDataError) as raised:
        build_site(RUN, node)
    sent = str(raised.value)
    assert sent.startswith("hospital st-mary: its data could not be read (1 bad row(s))") and "check-data" in sent
    assert "p10000032" not in sent and "effusion" not in sent and str(folder) not in sent
    assert any("p10000032" in r.getMessage() for r in caplog.records)       # the hospital's own log has it all
    assert "p10000032" in str(raised.value.__cause__)     # and its traceback (Flower logs it there, sends str())

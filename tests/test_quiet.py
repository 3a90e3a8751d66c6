"""The console stays about the user's run: third-party notes on what we do on purpose are silenced
where they arise (medvlm/quiet.py), and nothing else is."""

import re
import warnings

from medvlm.quiet import ACCOUNTING, DP_TRAINING, MODEL_LOADING, quiet, without_log


def _silenced(groups):
    return [re.compile(m) for g in groups for _, m in g]


def test_quiet_silences_its_warnings_and_nothing_else():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet(DP_TRAINING, ACCOUNTING):
            warnings.warn("Secure RNG turned off. This is perfectly fine", UserWarning)
            warnings.warn("Optimal order is the largest alpha. Please consider", UserWarning)
            warnings.warn("a warning of the user's own", UserWarning)
        warnings.warn("Secure RNG turned off, outside the block", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning of the user's own", "Secure RNG turned off, outside the block"]


def test_dp_training_and_model_loading_print_none_of_the_silenced_warnings(tiny_cfg, tiny_splits):
    from medvlm.build import build_medvlm
    from medvlm.config import PrivacyConfig, TrainConfig
    from medvlm.data.dataset import VQARows
    from medvlm.train import calibrated, train_local

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = build_medvlm(tiny_cfg.model, seed=0)
        result = train_local(model, VQARows(tiny_splits["train"].pixels, tiny_splits["train"].rows[:32]),
                             train=TrainConfig(epochs=1, batch_size=16),
                             privacy=calibrated(PrivacyConfig(), 32, TrainConfig(epochs=1, batch_size=16), max_steps=2),
                             max_steps=2, progress=False)
    assert result.privacy is not None and result.privacy.epsilon > 0           # DP did run
    patterns = _silenced([DP_TRAINING, ACCOUNTING, MODEL_LOADING])
    loud = [str(w.message)[:80] for w in seen if any(p.search(str(w.message)) for p in patterns)]
    assert loud == []


def test_without_log_drops_only_the_named_records(caplog):
    import logging

    with without_log("medvlm.test", "No pretrained weights"):
        logging.getLogger("medvlm.test").warning("No pretrained weights loaded for model x")
        logging.getLogger("medvlm.test").warning("something the user must read")
    logging.getLogger("medvlm.test").warning("No pretrained weights, after the block")
    assert [r.getMessage() for r in caplog.records] == ["something the user must read",
                                                         "No pretrained weights, after the block"]

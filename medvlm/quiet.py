"""Third-party warnings that do not concern a user of this tool, silenced in one place, each with
the reason it is harmless. Every filter is scoped (a context manager around the call that raises
it), never process-wide, so the same warning from other code still shows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

# (category, message regex, why it is harmless here)
DP_TRAINING = (
    # Opacus samples its noise from torch's generator unless secure_mode=True, which needs
    # torchcsprng (unmaintained, no wheels for current torch). Floating-point attacks on the
    # noise (Mironov 2012) need the attacker to see the unrounded noise of one step; a hospital
    # sends its update after many steps, in fp32 or lower.
    (UserWarning, r"Secure RNG turned off"),
    # The frozen vision tower and the frozen LM embeddings give no input that requires grad, so
    # torch fires the module hooks Opacus registers on outputs; the per-example gradients of the
    # trainable (fusion, LoRA) parameters are unaffected (tests/test_train.py: DP step == plain step).
    (UserWarning, r"Full backward hook is firing when gradients are computed with respect to module outputs"),
)
ACCOUNTING = (
    # Opacus' RDP accountant says the best order lies at the edge of its default orders: the
    # epsilon it returns is still a valid upper bound, only possibly looser than the tightest.
    (UserWarning, r"Optimal order is the (largest|smallest) alpha"),
)
MODEL_LOADING = (
    # PEFT asks transformers' deprecated `is_gradient_checkpointing` while wrapping the LM; the
    # answer is the same and nothing of ours calls it.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)

SIMULATION = (
    # Ray announces that it will stop hiding GPUs from actors that ask for none. Today's behaviour
    # is the one we want (a hospital given --gpus-per-hospital 0 trains on the CPU) and Ray is
    # pinned (constraints.txt); a Ray that changes it must be met in simulations/run.py.
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"),
)


@contextlib.contextmanager
def quiet(*groups: tuple) -> Iterator[None]:
    """Silence the warnings of ``groups`` (e.g. ``quiet(DP_TRAINING, ACCOUNTING)``) inside the block."""
    with warnings.catch_warnings():
        for group in groups:
            for category, message in group:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar: a 20-tensor tiny model loads in milliseconds, and in a
    simulation every hospital worker would print one each round."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class _Without(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.prefixes)


@contextlib.contextmanager
def without_log(logger: str, *prefixes: str) -> Iterator[None]:
    """Drop the records of ``logger`` ("" for the root) that start with one of ``prefixes``."""
    target, drop = logging.getLogger(logger), _Without(prefixes)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)

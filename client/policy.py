"""The hospital's privacy policy: its own settings, never the coordinator's.

In a deployment every privacy setting that bounds what leaves the site comes from the hospital's
node config (what ``medvlm-fl supernode`` passes to its SuperNode), never from the run config the
coordinator sends:

    dp             = "on"      "off" only if the hospital itself decides to train without DP
    epsilon        = 8.0       the hospital's budget at ``delta`` (required while dp is on)
    delta          = 1e-5
    max-grad-norm  = 1.0       DP-SGD's clipping bound
    accountant     = "rdp"     rdp | prv | gdp (Opacus); one per ledger
    min-noise      = 0.0       a floor on the noise multiplier: a round plan that would calibrate
                               less noise trains at the floor (and spends less than the budget)
    evaluate       = "counts"  "off": the site never scores a coordinator-sent state on its validation
                               split (evaluation replies are exact counts, not DP: docs/security.md)

The run config's ``privacy.*`` is only a proposal. A site trains at its own settings whatever the
proposal says and says so, in its log and in the status of its reply, whenever the proposal
differed (e.g. the run proposed ``privacy.enabled=false``).

In a simulation (Flower injects ``partition-id``) the researcher is every hospital at once: the
run config's ``privacy.*`` is the sites' policy, and a node config ``epsilon``/``delta`` still
overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from medvlm.config import PrivacyConfig

ACCOUNTANTS = ("rdp", "prv", "gdp")
POLICY_KEYS = ("dp", "epsilon", "delta", "max-grad-norm", "accountant", "min-noise", "evaluate")
EVALUATE = ("counts", "off")


def _number(node_config: Mapping, key: str, default: Optional[float]) -> float:
    """A number from the hospital's node config (TOML gives numbers; a quoted one is read), naming the
    key when it is not one: ``true`` is not a budget of 1."""
    value = node_config.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"site privacy policy (node config): {key}={value!r} is not a number: write it as one "
                         "in --node-config (e.g. \"epsilon=8 delta=1e-5\")") from None


@dataclass(frozen=True)
class SitePolicy:
    dp: bool
    epsilon: Optional[float]          # the budget (None only with dp off)
    delta: float
    max_grad_norm: float
    accountant: str
    min_noise: float = 0.0
    evaluate: str = "counts"          # counts | off: whether the site scores coordinator-sent states
    source: str = "node config"       # where the settings came from (said in logs and replies)

    def __post_init__(self) -> None:
        def bad(key: str, value: object, fix: str) -> ValueError:
            return ValueError(f"site privacy policy ({self.source}): {key}={value!r} {fix}")

        if self.dp and (self.epsilon is None or not math.isfinite(self.epsilon) or self.epsilon <= 0):
            raise bad("epsilon", self.epsilon, "must be a finite number > 0 while dp is on: the hospital's own "
                      "budget (medvlm-fl supernode --epsilon 8)")
        if not 0 < self.delta < 1:
            raise bad("delta", self.delta, "must be in (0, 1), e.g. 1e-5")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise bad("max-grad-norm", self.max_grad_norm, "must be > 0")
        if self.accountant not in ACCOUNTANTS:
            raise bad("accountant", self.accountant, f"use one of {list(ACCOUNTANTS)}")
        if not (math.isfinite(self.min_noise) and self.min_noise >= 0):
            raise bad("min-noise", self.min_noise, "must be >= 0")
        if self.evaluate not in EVALUATE:
            raise bad("evaluate", self.evaluate, f"use one of {list(EVALUATE)} (medvlm-fl supernode --evaluate off)")

    # ------------------------------------------------------------------------------ reading
    @classmethod
    def for_site(cls, node_config: Mapping, proposal: PrivacyConfig) -> "SitePolicy":
        """A deployed hospital (``hospital`` in its node config): its node config only. A simulated
        one (``partition-id`` injected): the run config, with node-config epsilon/delta on top."""
        if "hospital" not in node_config and "partition-id" in node_config:
            return cls(dp=proposal.enabled,
                       epsilon=float(node_config.get("epsilon", proposal.target_epsilon or 0.0)) or None,
                       delta=float(node_config.get("delta", proposal.delta)), max_grad_norm=proposal.max_grad_norm,
                       accountant=proposal.accountant,
                       min_noise=float(node_config.get("min-noise", 0.0)),
                       evaluate=str(node_config.get("evaluate", "counts")),
                       source="run config (simulation: the researcher is every site)")
        dp = str(node_config.get("dp", "on")).strip().lower()
        if dp not in ("on", "off"):
            raise ValueError(f"site privacy policy (node config): dp={dp!r}: use \"on\" or \"off\"")
        epsilon = node_config.get("epsilon")
        return cls(dp=dp == "on", epsilon=None if epsilon is None else _number(node_config, "epsilon", None),
                   delta=_number(node_config, "delta", 1e-5),
                   max_grad_norm=_number(node_config, "max-grad-norm", 1.0),
                   accountant=str(node_config.get("accountant", "rdp")),
                   min_noise=_number(node_config, "min-noise", 0.0),
                   evaluate=str(node_config.get("evaluate", "counts")))

    # ------------------------------------------------------------------------------ applying
    def govern(self, proposal: PrivacyConfig) -> tuple[PrivacyConfig, list[str]]:
        """The privacy config this site trains with (its own settings; the run's Opacus mode is kept,
        it does not change the guarantee), and a note for every proposed setting it did not apply."""
        ours = replace(proposal, enabled=self.dp, target_epsilon=self.epsilon if self.dp else proposal.target_epsilon,
                       noise_multiplier=None if self.dp else proposal.noise_multiplier, delta=self.delta,
                       max_grad_norm=self.max_grad_norm, accountant=self.accountant)
        notes = []
        for key, proposed, applied in (
                ("privacy.enabled", proposal.enabled, self.dp),
                ("privacy.target_epsilon", proposal.target_epsilon, self.epsilon if self.dp else None),
                ("privacy.noise_multiplier", proposal.noise_multiplier, None),
                ("privacy.delta", proposal.delta, self.delta),
                ("privacy.max_grad_norm", proposal.max_grad_norm, self.max_grad_norm),
                ("privacy.accountant", proposal.accountant, self.accountant)):
            if not self.dp and key != "privacy.enabled":
                continue
            if proposed is not None and proposed != applied:
                notes.append(f"{key}={proposed} proposed, {applied} applied")
        return ours, notes

    def describe(self) -> str:
        if not self.dp:
            return f"DP off (this site's decision, {self.source})"
        floor = f", noise >= {self.min_noise:g}" if self.min_noise else ""
        return (f"DP-SGD at epsilon <= {self.epsilon:g}, delta {self.delta:g}, clip {self.max_grad_norm:g}, "
                f"{self.accountant} accountant{floor} ({self.source})")

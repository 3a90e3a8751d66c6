"""The hospital's on-site privacy ledger: one accountant state for the whole federation.

Flower's Opacus example builds a new PrivacyEngine every round, so its epsilon covers one round.
Here a hospital fixes its DP mechanism once (noise multiplier for its whole planned
participation at its own budget), appends every round's DP-SGD steps to one persisted history,
and refuses any round that would take it past its budget. The coordinator cannot override it:
the budget comes from the hospital's node config (``client/policy.py``), and the ledger lives in
its state directory.

A ledger is created once, when a site is set up (``Ledger.init``, run by ``medvlm-fl supernode``).
Afterwards a deployed site refuses to train without it (a lost ledger would silently restart the
accounting from zero), and its budget is never raised by opening it: only ``raise_budget``, the
site's own deliberate act, does that, and the ledger records it.

Whoever reads the ledger to spend from it or change it holds :func:`exclusive` until it is written
back: a SuperNode serves each run's tasks in a process of their own, so a coordinator starting two
runs at once would otherwise have two processes read the same spent epsilon, both train, and the
later write erase the earlier charge.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from medvlm.files import write_text
from medvlm.privacy import History, PrivacyBudgetExceeded, calibrate_noise, epsilon

if TYPE_CHECKING:
    from medvlm.config import Stage

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = ".privacy-ledger.lock"

log = logging.getLogger("medvlm.client")


@contextlib.contextmanager
def exclusive(state_dir: str | Path) -> Iterator[None]:
    """Hold this hospital's ledger for one task (read, train, charge, write), waiting while another holds it.
    An OS file lock (``filelock``): released when its holder exits, crashed or not, so no stale lock remains."""
    from filelock import FileLock, Timeout

    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another task holds this hospital's privacy ledger; waiting for it to finish", state)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclass
class Ledger:
    hospital: str
    budget: float                    # target epsilon: the hospital's, not the coordinator's
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: Optional[float] = None   # fixed at first participation
    sample_rate: Optional[float] = None
    history: History = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)   # server rounds this hospital trained in
    stage: Optional[str] = None      # the curriculum stage the mechanism above was fixed for
    budget_changes: list[dict] = field(default_factory=list)   # the site's own raises, with when and why
    stage_mechanisms: dict = field(default_factory=dict)   # stage -> [noise multiplier, sample rate] fixed for it
    kept: dict = field(default_factory=dict)   # str(server round) -> key of the request whose charged update is kept

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A ledger read back holds what ``save`` wrote, or it is refused; ``save`` writes nothing it would
        refuse: a negative step count edited in spends negative epsilon (budget gained), a NaN makes the
        accountant hang."""
        def number(value: object, what: str, low: float = 0.0, *, strict: bool = True) -> None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                    (value <= low if strict else value < low):
                raise ValueError(f"{what}={value!r} is not a finite number {'>' if strict else '>='} {low:g}")

        number(self.budget, "budget")
        number(self.max_grad_norm, "max_grad_norm")
        number(self.delta, "delta")
        if self.delta >= 1:
            raise ValueError(f"delta={self.delta!r} is not below 1")
        if self.noise_multiplier is not None:
            number(self.noise_multiplier, "noise_multiplier", strict=False)
        for i, step in enumerate(self.history):
            if len(step) != 3:
                raise ValueError(f"history[{i}]={list(step)!r} is not [noise multiplier, sample rate, steps]")
            number(step[0], f"history[{i}] noise multiplier", strict=False)
            number(step[1], f"history[{i}] sample rate")
            if step[1] > 1:
                raise ValueError(f"history[{i}] sample rate={step[1]!r} is over 1")
            number(step[2], f"history[{i}] steps", strict=False)
        if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in self.rounds):
            raise ValueError(f"rounds={self.rounds!r} are not round numbers")

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def open(cls, state_dir: str | Path, *, hospital: str, budget: float, delta: float, accountant: str,
             max_grad_norm: float, must_exist: bool = False) -> "Ledger":
        """Load the hospital's ledger, or (``must_exist=False``: a simulation's run folder) start one.
        A ledger for another delta/accountant is refused: mixing them would make the recorded epsilon
        meaningless. A budget above the recorded one is refused: see ``raise_budget``."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            if must_exist:
                raise ValueError(
                    f"privacy ledger {path} is missing: it was created when this site was set up (medvlm-fl "
                    "supernode) and records every round this hospital trained. Restore it from backup; training "
                    "without it would restart this hospital's privacy accounting from zero. (A site that never "
                    "trained: `medvlm-fl ledger init` on an empty state dir.)")
            return cls(hospital, budget, delta, accountant, max_grad_norm)
        try:
            data = json.loads(path.read_text())
            ledger = cls(**{**data, "history": [tuple(h) for h in data["history"]]})
        except (ValueError, TypeError, KeyError) as err:    # JSONDecodeError is a ValueError
            raise ValueError(f"privacy ledger {path} is unreadable ({err}); it records this hospital's spent "
                             "privacy, so it must be restored from backup, not deleted") from None
        if ledger.hospital != hospital:   # two sites sharing a state dir would race on one ledger and mix spending
            raise ValueError(f"privacy ledger {path} belongs to hospital {ledger.hospital!r}, but this site is "
                             f"{hospital!r}: each hospital keeps its own state dir (a renamed site: give it its old "
                             "name back)")
        for key, want in (("delta", delta), ("accountant", accountant)):
            if getattr(ledger, key) != want:
                raise ValueError(f"privacy ledger {path} was kept with {key}={getattr(ledger, key)!r}, but this "
                                 f"run asks for {key}={want!r}; one hospital keeps one accountant")
        if budget > ledger.budget + 1e-9:
            raise ValueError(
                f"privacy ledger {path} holds budget epsilon={ledger.budget:g}, but {budget:g} was asked for: a "
                "budget is never raised by starting a run. If this hospital decides to raise it, run "
                f"`medvlm-fl ledger raise {Path(state_dir)} --epsilon {budget:g} --reason \"...\"` (recorded)")
        ledger.budget = budget  # the site may lower its own budget
        return ledger

    @classmethod
    def init(cls, state_dir: str | Path, *, hospital: str, budget: float, delta: float, accountant: str,
             max_grad_norm: float) -> tuple["Ledger", bool]:
        """Set up a site's ledger: open the existing one, or create it in a state dir that holds nothing
        else yet. A used state dir (feature cache, site files) without a ledger is refused: the ledger
        was lost. Returns (ledger, created)."""
        state = Path(state_dir)
        if (state / LEDGER_FILE).exists():
            return cls.open(state, hospital=hospital, budget=budget, delta=delta, accountant=accountant,
                            max_grad_norm=max_grad_norm), False
        used = sorted(p.name for p in state.iterdir() if p.name != LOCK_FILE) if state.is_dir() else []
        if used:
            raise ValueError(f"state dir {state} has been used ({', '.join(used[:4])}) but holds no privacy ledger "
                             f"({LEDGER_FILE}): restore the ledger from backup, or give this site a new, empty "
                             "state dir only if it has never trained")
        ledger = cls(hospital, budget, delta, accountant, max_grad_norm)
        ledger.save(state)
        return ledger, True

    def raise_budget(self, epsilon: float, *, reason: str) -> None:
        """The site's own decision to allow more spending; kept in the ledger with when and why."""
        import datetime

        if not reason.strip():
            raise ValueError("raising a privacy budget needs a reason (kept in the ledger)")
        if not math.isfinite(epsilon) or epsilon <= self.budget:
            raise ValueError(f"epsilon {epsilon:g} is not a finite number above the current budget {self.budget:g}")
        self.budget_changes.append({"from": self.budget, "to": epsilon, "reason": reason,
                                    "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        self.budget = epsilon

    def save(self, state_dir: str | Path) -> Path:
        """Atomic write: a crash never leaves a half-written ledger (spending is never lost)."""
        self.validate()
        data = asdict(self)
        data["history"] = [list(h) for h in self.history]
        return write_text(Path(state_dir) / LEDGER_FILE, json.dumps(data, indent=1), durable=True)

    # ----------------------------------------------------------------------------- accounting
    @property
    def epsilon(self) -> float:
        return epsilon(self.history, delta=self.delta, accountant=self.accountant)

    @property
    def total_steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def plan(self, *, sample_rate: float, steps_per_round: int, rounds_left: int, stage: str = "main",
             target: Optional[float] = None, min_noise: float = 0.0) -> float:
        """Fix the noise multiplier once per curriculum stage, so the stage's planned rounds end at
        ``target`` (default: the whole budget; the last stage's target is the budget); later calls in
        the stage reuse it.

        A fixed (sigma, q) per stage makes the history one mechanism per stage, so anyone can
        recompute epsilon from (noise_multiplier, sample_rate, steps) of each stage and delta.
        ``min_noise`` is the site's floor: a plan that calibrates less noise uses the floor instead."""
        if self.noise_multiplier is not None and self.stage in (stage, None):
            if not math.isclose(self.sample_rate, sample_rate, rel_tol=1e-9):
                raise ValueError(f"{self.hospital}: sample rate changed from {self.sample_rate} to {sample_rate} "
                                 "(batch size or data size changed); the ledger keeps one mechanism per hospital "
                                 "and stage")
            self.stage = stage
            return self.noise_multiplier
        target = min(self.budget, self.budget if target is None else target)
        self.noise_multiplier = calibrate_noise(
            target_epsilon=target, delta=self.delta, sample_rate=sample_rate,
            steps=steps_per_round * rounds_left, accountant=self.accountant, history=self.history)
        self.noise_multiplier = max(self.noise_multiplier, min_noise)
        self.sample_rate, self.stage = sample_rate, stage
        self.stage_mechanisms[stage] = [self.noise_multiplier, sample_rate]
        return self.noise_multiplier

    def plan_for(self, stage: Stage, *, server_round: int, num_rounds: int, planned_rounds: int,
                 sample_rate: float, steps_per_round: int, min_noise: float = 0.0) -> float:
        """This hospital's noise multiplier for ``server_round`` of ``stage``, then the check that the
        round's steps fit its budget (PrivacyBudgetExceeded if not). Each stage ends at its share of
        the budget (``stage.budget_end``; the last stage at all of it); the last stage runs to the
        coordinator's round count ``num_rounds`` (a resumed run may have extended the
        ``planned_rounds`` of the run config)."""
        last = num_rounds if stage.last_round >= planned_rounds else stage.last_round
        sigma = self.plan(sample_rate=sample_rate, steps_per_round=steps_per_round,
                          rounds_left=max(1, last - server_round + 1), stage=stage.name,
                          target=self.budget * stage.budget_end, min_noise=min_noise)
        self.check(steps_per_round)
        return sigma

    def epsilon_after(self, steps: int) -> float:
        assert self.noise_multiplier is not None and self.sample_rate is not None, "plan() first"
        return epsilon(self.history + [(self.noise_multiplier, self.sample_rate, steps)], delta=self.delta,
                       accountant=self.accountant)

    def check(self, steps: int) -> None:
        """Raise PrivacyBudgetExceeded if ``steps`` more DP-SGD steps would exceed the budget."""
        after = self.epsilon_after(steps)
        if after > self.budget + 1e-6:
            raise PrivacyBudgetExceeded(
                f"{self.hospital}: {steps} more DP-SGD steps would take epsilon from {self.epsilon:.3f} to "
                f"{after:.3f}, past this hospital's budget {self.budget:g} at delta={self.delta:g}")

    def record(self, *, history: History, server_round: int, key: Optional[str] = None) -> None:
        """Adopt the accountant's history after a round. Opacus merges consecutive steps of one
        mechanism into one entry, so the check is on what matters: spending never goes down.
        ``key``: the request this round answered (see ``client/rounds.py``); its kept update may be
        sent again for the same request without being charged again."""
        new_total = int(sum(h[2] for h in history))
        if new_total < self.total_steps:
            raise ValueError(f"{self.hospital}: the accountant's history has {new_total} steps, fewer than the "
                             f"{self.total_steps} already in the ledger; refusing to rewrite recorded spending")
        self.history = [tuple(h) for h in history]
        self.rounds.append(server_round)
        if key is not None:
            self.kept[str(server_round)] = key

    def mechanisms(self) -> list[dict]:
        """The history as (noise multiplier, sample rate, steps) per run of one mechanism, each named by
        the curriculum stage it was fixed for: exactly what recomputes ``epsilon``."""
        out: list[dict] = []
        for sigma, q, steps in self.history:
            stage = next((name for name, (s, r) in self.stage_mechanisms.items()
                          if math.isclose(s, sigma, rel_tol=1e-12) and math.isclose(r, q, rel_tol=1e-12)), None)
            if out and (out[-1]["noise_multiplier"], out[-1]["sample_rate"]) == (sigma, q):
                out[-1]["steps"] += int(steps)
            else:
                out.append({"stage": stage or self.stage or "main", "noise_multiplier": sigma, "sample_rate": q,
                            "steps": int(steps)})
        return out

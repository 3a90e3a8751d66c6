"""Privacy accounting: thin helpers over Opacus' accountants.

The accountant's state is its ``history``: a list of ``(noise_multiplier, sample_rate,
steps)`` entries. It is what a hospital persists between rounds, so spending accumulates
across the whole federation, and it is enough for anyone to recompute epsilon.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from opacus.accountants import create_accountant

from medvlm.quiet import ACCOUNTING, quiet

History = list[tuple[float, float, int]]


class PrivacyBudgetExceeded(RuntimeError):
    """Training would push epsilon past the configured budget."""


@dataclass
class PrivacySpent:
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int               # DP-SGD steps in this call
    total_steps: int         # steps in the whole history (all calls)
    accountant: str
    max_grad_norm: float

    def as_dict(self) -> dict:
        return asdict(self)


def epsilon(history: Sequence[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a whole history at ``delta`` (cached: RDP at small noise costs ~0.1 s a call)."""
    if not history:
        return 0.0
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
@quiet(ACCOUNTING)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", history: Sequence[Sequence[float]] = (),
                    tolerance: float = 0.01) -> float:
    """Smallest noise multiplier such that ``history`` + ``steps`` more steps stays <= target.

    Opacus' ``get_noise_multiplier`` calibrates a fresh run only; here prior spending (earlier
    rounds) counts too, so the search composes it with the planned steps.
    """
    spent = epsilon(history, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExceeded(
            f"epsilon already spent ({spent:.3f}) reaches the target {target_epsilon} at delta={delta}: "
            "no further DP-SGD steps are possible")
    eps_at = lambda sigma: epsilon(list(history) + [(sigma, sample_rate, steps)], delta=delta,  # noqa: E731
                                   accountant=accountant)
    low, high = 0.0, 10.0
    while eps_at(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise PrivacyBudgetExceeded(
                f"epsilon already spent ({spent:.3f}) leaves no room under the target {target_epsilon} for "
                f"{steps} more steps at sample rate {sample_rate}: no noise multiplier <= 1e4 fits")
    while eps_at(high) < target_epsilon - tolerance and high - low > 1e-4:
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def save_accountant_state(state: dict, path: str | Path) -> None:
    """Write atomically: a crash mid-write must never lose recorded spending."""
    from medvlm.files import write_text

    write_text(path, json.dumps({"mechanism": state["mechanism"], "history": [list(h) for h in state["history"]]}),
               durable=True)


def load_accountant_state(path: str | Path) -> Optional[dict]:
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return {"mechanism": data["mechanism"], "history": [tuple(h) for h in data["history"]]}

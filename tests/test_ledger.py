"""The on-site ledger: one mechanism per hospital, persisted, never past its budget."""

import json

import pytest

from client.ledger import LEDGER_FILE, Ledger
from medvlm.privacy import PrivacyBudgetExceeded, epsilon


def _open(tmp_path, budget=8.0, delta=1e-5):
    return Ledger.open(tmp_path, hospital="general", budget=budget, delta=delta, accountant="rdp", max_grad_norm=1.0)


def test_plan_fixes_one_mechanism_that_ends_at_the_budget(tmp_path):
    ledger = _open(tmp_path)
    sigma = ledger.plan(sample_rate=0.05, steps_per_round=40, rounds_left=5)
    for rnd in range(1, 6):
        ledger.check(40)
        ledger.record(history=ledger.history + [(sigma, 0.05, 40)], server_round=rnd)
        ledger.save(tmp_path)
        ledger = _open(tmp_path)                      # a restart between every round
        assert ledger.plan(sample_rate=0.05, steps_per_round=40, rounds_left=5 - rnd) == sigma
    assert 7.9 < ledger.epsilon <= 8.0
    assert ledger.total_steps == 200
    # anyone can recompute epsilon from (sigma, q, steps, delta) alone
    assert abs(epsilon([(sigma, 0.05, 200)], delta=1e-5) - ledger.epsilon) < 1e-6
    with pytest.raises(PrivacyBudgetExceeded, match="past this hospital's budget 8"):
        ledger.check(40)


def test_a_lower_node_budget_takes_effect_and_refuses(tmp_path):
    ledger = _open(tmp_path)
    sigma = ledger.plan(sample_rate=0.05, steps_per_round=40, rounds_left=2)
    ledger.record(history=[(sigma, 0.05, 40)], server_round=1)
    ledger.save(tmp_path)
    spent = ledger.epsilon
    stricter = _open(tmp_path, budget=spent)          # the hospital lowered its own budget
    stricter.plan(sample_rate=0.05, steps_per_round=40, rounds_left=1)
    with pytest.raises(PrivacyBudgetExceeded):
        stricter.check(40)


def test_ledger_refuses_mixing_mechanisms_and_rewrites(tmp_path):
    ledger = _open(tmp_path)
    sigma = ledger.plan(sample_rate=0.05, steps_per_round=10, rounds_left=1)
    ledger.record(history=[(sigma, 0.05, 10)], server_round=1)
    ledger.save(tmp_path)
    with pytest.raises(ValueError, match="delta"):
        _open(tmp_path, delta=1e-6)
    with pytest.raises(ValueError, match="belongs to hospital 'general', but this site is 'oncology'"):
        Ledger.open(tmp_path, hospital="oncology", budget=8.0, delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="own state dir"):       # `ledger init` for another site says so too
        Ledger.init(tmp_path, hospital="oncology", budget=8.0, delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="sample rate changed"):
        _open(tmp_path).plan(sample_rate=0.1, steps_per_round=10, rounds_left=1)
    with pytest.raises(ValueError, match="fewer than"):
        _open(tmp_path).record(history=[(sigma, 0.05, 3)], server_round=2)


def test_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="restored from backup"):
        _open(tmp_path)
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"hospital": "general"}))
    with pytest.raises(ValueError, match="unreadable"):
        _open(tmp_path)


def test_a_ledger_edited_to_hold_what_save_never_writes_is_refused(tmp_path):
    """A negative step count in the history spends negative epsilon (more budget), a NaN one makes the
    accountant hang: a ledger that reads back with a non-number, NaN or out-of-range field is
    unreadable (restore it), never a budget."""
    ledger = _open(tmp_path)
    sigma = ledger.plan(sample_rate=0.05, steps_per_round=40, rounds_left=5)
    ledger.record(history=[(sigma, 0.05, 40)], server_round=1)
    ledger.save(tmp_path)
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert _open(tmp_path).epsilon > 0
    assert epsilon([(sigma, 0.05, -40)], delta=1e-5) < 0                  # what an edit could buy
    for key, value, named in (("history", [[sigma, 0.05, float("nan")]], "history.0. steps"),
                              ("history", [[sigma, 0.05, -40]], "history.0. steps=-40"),
                              ("history", [[float("nan"), 0.05, 40]], "history.0. noise multiplier=nan"),
                              ("history", [[sigma, 1.5, 40]], "history.0. sample rate=1.5"),
                              ("history", [[sigma, 0.05]], "history.0.=.* is not .noise multiplier"),
                              ("budget", "8", "budget='8'"), ("delta", 0, "delta=0"),
                              ("rounds", ["1"], "rounds=")):
        (tmp_path / LEDGER_FILE).write_text(json.dumps({**saved, key: value}))
        with pytest.raises(ValueError, match=f"unreadable .*{named}.*restored from backup"):
            _open(tmp_path)


def test_the_ledger_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    """client.ledger.exclusive is an OS lock: a task in another process waits for the holder to write back
    (the charge of a concurrent run's round), and a holder that dies (killed mid-training) leaves no stale lock."""
    import subprocess
    import sys
    import time

    from client.ledger import exclusive

    holder = ("import sys, time, pathlib; from client.ledger import exclusive\n"
              "d = pathlib.Path(sys.argv[1])\n"
              "with exclusive(d):\n"
              "    (d / 'in').write_text('1'); time.sleep(float(sys.argv[2])); (d / 'out').write_text('1')\n")

    def start(hold_s):
        for marker in ("in", "out"):
            (tmp_path / marker).unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path), str(hold_s)])
        deadline = time.monotonic() + 60
        while not (tmp_path / "in").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        return child

    child = start(1.0)
    with exclusive(tmp_path):
        assert (tmp_path / "out").exists()           # entered only once the holder had written back
    child.wait(timeout=60)
    child = start(600)
    child.kill()                                     # dies holding it
    child.wait(timeout=60)
    with exclusive(tmp_path):                        # taken at once, no stale lock
        assert not (tmp_path / "out").exists()

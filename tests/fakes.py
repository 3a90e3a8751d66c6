"""Test doubles: the in-process Grid lives in ``simulations.inprocess`` (benchmarks use it too)."""

from simulations.inprocess import InProcessGrid, Killed, set_task_identity

__all__ = ["InProcessGrid", "Killed", "set_task_identity"]

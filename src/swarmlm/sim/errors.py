"""The simulator's exceptions: its own defects are never reported as protocol bugs."""

from __future__ import annotations


class SimulationError(Exception):
    """Base of every error the simulator raises."""


class SimulatorInvariantError(SimulationError):
    """The simulator broke one of its own rules (clock, message accounting): a bug in
    :mod:`swarmlm.sim`, not in the protocol under test."""


class SimulatorDeadlockError(SimulatorInvariantError):
    """The virtual loop has nothing left to run (no timer, no message in flight)."""


class ScheduleError(SimulationError, ValueError):
    """Impossible simulation parameters (unknown fault, f >= n/3 asked to be live, ...)."""

"""How many faulty or crashed members a round membership survives, and the warning a node
gives when that is none.

The round protocol (docs/protocol.md) decides with a quorum of ``n - f`` votes among ``n``
members, ``f = (n - 1) // 3``. With ``n < 4`` that is ``f = 0``: every member's vote is
needed, so one crash (or one Byzantine member) stops every round. A local swarm of three
looks healthy until then; the node says so at start, in its health payload and on its
dashboard, and again whenever the membership changes.
"""

from __future__ import annotations


def faults_tolerated(n: int) -> int:
    """Faulty or crashed members that ``n`` members survive: ``(n - 1) // 3`` (0 for none)."""
    return max(0, (n - 1) // 3)


def fault_tolerance_warning(n: int, want_f: int = 1) -> str | None:
    """The warning for a membership of ``n`` that tolerates fewer than ``want_f`` faults
    (``n < 3 * want_f + 1``), or None when it tolerates them or no membership exists yet
    (``n <= 0``)."""
    if want_f < 1:
        raise ValueError(f"want_f must be at least 1, got {want_f}")
    need = 3 * want_f + 1
    if n <= 0 or n >= need:
        return None
    f = faults_tolerated(n)
    who = "member tolerates" if n == 1 else "members tolerate"
    what = f"{f or 'no'} faulty or crashed member{'s' if f > 1 else ''}"
    return f"n = {n} {who} {what} (need n >= {need} for f = {want_f})"

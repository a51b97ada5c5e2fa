"""Where a restarted node resumes the round protocol (issue 17 #2).

A node persists, after each decision, the last decided round, the membership of the next
round and that round's decision certificate under its node dir. Restarted from that dir it
resumes at ``round + 1`` with that membership instead of round 1, and catches up from the
swarm's certificates (``RoundProtocol`` decides far-behind rounds without their payloads,
see ``Decision.skipped``). The file is our own record, so it is trusted as our own memory;
everything learnt later from peers is verified as usual.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmlm.p2p.consensus import Decision

log = logging.getLogger(__name__)

STATE_FILE = "p2p_round_state.json"


@dataclass(frozen=True)
class ResumeState:
    """The protocol's durable position: ``last_decided`` and the next round's members."""

    last_decided: int
    members_next: list[str]


def _hexify(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    if isinstance(obj, dict):
        return {k: _hexify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_hexify(v) for v in obj]
    return obj


def save_resume_state(node_dir: Path, decision: Decision) -> None:
    """Atomically record ``decision`` as the last decided round (tmp + fsync + rename, so a
    crash leaves either the old or the new state, never a torn file)."""
    path = node_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    doc = {
        "last_decided": decision.round,
        "members_next": decision.members_next,
        "certificate": _hexify(decision.certificate),
    }
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_resume_state(node_dir: Path) -> ResumeState | None:
    """The persisted position, or None when there is none or it is unreadable (then the node
    starts as a new one; a bad file is logged with its path, not fatal)."""
    path = node_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        last, members = int(doc["last_decided"]), doc["members_next"]
        if last < 0 or not members or not all(isinstance(m, str) for m in members):
            raise ValueError("bad last_decided or members_next")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable round state %s: %s", path, e)
        return None
    return ResumeState(last, sorted(set(members)))

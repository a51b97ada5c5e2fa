"""Decentralized training: rounds of compressed updates, agreed by the p2p round protocol,
robustly aggregated and applied identically on every honest peer (see docs/swarm.md).

The round engine (:class:`RoundEngine`) is pure computation; :class:`SwarmWorker` adds the
trainer; :class:`LocalSwarm` runs N workers in one process; :class:`SwarmNode` is a real peer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarmlm.swarm.config import SwarmConfig, SwarmRunConfig, load_swarm_config
    from swarmlm.swarm.engine import RoundEngine, RoundReport
    from swarmlm.swarm.errors import (
        ContributionError,
        OutOfSyncError,
        StateSyncError,
        SwarmError,
    )
    from swarmlm.swarm.node import SwarmNode, SwarmResult
    from swarmlm.swarm.simulate import LocalSwarm
    from swarmlm.swarm.worker import SwarmWorker

# Imported on first use: a lightweight node uses the torch-free parts of this package
# (membership, abstain entries, the voter) and must not pay for torch.
_LAZY = {
    "SwarmConfig": "config",
    "SwarmRunConfig": "config",
    "load_swarm_config": "config",
    "RoundEngine": "engine",
    "RoundReport": "engine",
    "ContributionError": "errors",
    "OutOfSyncError": "errors",
    "StateSyncError": "errors",
    "SwarmError": "errors",
    "SwarmNode": "node",
    "SwarmResult": "node",
    "LocalSwarm": "simulate",
    "SwarmWorker": "worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swarmlm.swarm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"swarmlm.swarm.{module}"), name)


__all__ = [
    "ContributionError",
    "LocalSwarm",
    "OutOfSyncError",
    "RoundEngine",
    "RoundReport",
    "StateSyncError",
    "SwarmConfig",
    "SwarmError",
    "SwarmNode",
    "SwarmResult",
    "SwarmRunConfig",
    "SwarmWorker",
    "load_swarm_config",
]

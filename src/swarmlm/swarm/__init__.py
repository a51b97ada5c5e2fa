"""Decentralized training: rounds of compressed updates, agreed by the p2p round protocol,
robustly aggregated and applied identically on every honest peer (see docs/swarm.md).

The round engine (:class:`RoundEngine`) is pure computation; :class:`SwarmWorker` adds the
trainer; :class:`LocalSwarm` runs N workers in one process; :class:`SwarmNode` is a real peer.
"""

from swarmlm.swarm.config import SwarmConfig, SwarmRunConfig, load_swarm_config
from swarmlm.swarm.engine import RoundEngine, RoundReport
from swarmlm.swarm.errors import ContributionError, OutOfSyncError, StateSyncError, SwarmError
from swarmlm.swarm.node import SwarmNode, SwarmResult
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker

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

"""N simulated peers in one process, the round protocol replaced by an in-process fake.

The fake decides the set every real honest peer would agree on: one entry per contributing
peer, sorted by peer id (optionally minus some peers, as when contributions are late or a
peer crashed). Everything else is the real code path: each :class:`SwarmWorker` trains,
compresses, decodes, aggregates and applies exactly as it does over the network, so this
is what tests of bitwise identity, convergence and robustness drive.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from swarmlm.swarm.engine import RoundReport
from swarmlm.swarm.errors import OutOfSyncError, StateSyncError
from swarmlm.swarm.worker import SwarmWorker


class LocalSwarm:
    """Peers in one process; ``state_store`` plays the blob store peers fetch states from."""

    def __init__(self, workers: list[SwarmWorker]) -> None:
        self.workers = {w.node_id: w for w in workers}
        self.resyncs: dict[str, int] = dict.fromkeys(self.workers, 0)
        # with overlap, round r's local phase starts from the state before round r - 1
        self._base: dict[str, tuple[Tensor, bytes]] = {}

    def run_round(self, round: int, absent: Iterable[str] = ()) -> dict[str, RoundReport]:
        """Every present peer trains and contributes; every peer (absent ones included)
        applies the decided set, resynchronising from the agreed state when it differs.
        With ``swarm.overlap`` a peer's local phase for round r starts from its state before
        round r - 1, as when it computes r while r - 1 is still being communicated."""
        skip = set(absent)
        payloads = {}
        for pid, w in self.workers.items():
            now = (w.engine.params.clone(), w.engine.state_digest())
            start, base = self._base.get(pid, now) if w.cfg.swarm.overlap else now
            if pid not in skip:
                payloads[pid] = w.contribution(round, w.local_phase(start), base)
            self._base[pid] = now
        store = {w.engine.state_digest(): w.engine.state_blob() for w in self.workers.values()}
        decided = sorted(payloads.items())
        members = sorted(self.workers)
        reports = {}
        for pid, w in self.workers.items():
            try:
                reports[pid] = w.apply(round, list(decided), members)
            except OutOfSyncError as exc:
                blob = store.get(exc.digest)
                if blob is None:
                    raise StateSyncError(
                        f"no peer holds the agreed state {exc.digest.hex()[:12]}"
                    ) from exc
                w.load_state(blob, exc.digest)
                self.resyncs[pid] += 1
                reports[pid] = w.apply(round, list(decided), members)
        return reports

    def close(self) -> None:
        for w in self.workers.values():
            w.close()

"""Where a peer resumed from its checkpoint starts following the swarm."""

from __future__ import annotations

from swarmlm.swarm.node import resume_point

MEMBERS = ["a", "b", "c"]
LATER = ["a", "b", "c", "d"]


def test_a_peer_close_behind_replays_the_rounds_it_missed() -> None:
    assert resume_point((51, MEMBERS), (55, LATER), keep_rounds=8) == (52, MEMBERS)
    assert resume_point((51, MEMBERS), None, keep_rounds=8) == (52, MEMBERS)  # nobody answered


def test_a_peer_further_behind_than_the_payloads_are_kept_starts_at_the_head() -> None:
    # The integrated-network test: resumed at 51, the swarm at 61, payloads kept 8 rounds:
    # round 52's decision could never complete, so the peer waited until round_timeout.
    assert resume_point((51, MEMBERS), (61, LATER), keep_rounds=8) == (62, LATER)
    assert resume_point((51, MEMBERS), (56, LATER), keep_rounds=8) == (57, LATER)

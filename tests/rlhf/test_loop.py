"""The RLHF loop's state machine as pure logic: phases, thresholds, waits, restart resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.rlhf.loop import (
    LoopHistory,
    LoopState,
    LoopThresholds,
    advance,
    agreed_labels,
    initial_state,
    waiting_reason,
)
from swarmlm.rlhf.loop_objective import decode_record, encode_record

T = LoopThresholds(pretrain_rounds=3, min_labels=4, reward_rounds=2, policy_rounds=2)


def run(t: LoopThresholds, claims_per_round: list[list[int | None]]) -> list[LoopState]:
    state, out = initial_state(t), []
    for r, claims in enumerate(claims_per_round, start=1):
        state = advance(state, t, r, claims)
        out.append(state)
    return out


def test_a_full_cycle_goes_through_every_phase_at_the_configured_rounds() -> None:
    labels = [[0]] * 3 + [[0], [2], [5]] + [[5]] * 4
    states = run(T, labels)
    phases = [s.phase for s in states]
    # round 3 ends pretraining; rounds 4-6 collect (5 labels at round 6 >= 4 new);
    # rounds 7-8 reward; rounds 9-10 policy; then collecting again for cycle 1
    assert phases == ["pretrain"] * 2 + ["collect"] * 3 + ["reward"] * 2 + ["policy"] * 2 + [
        "collect"
    ]
    assert states[5].since == 7
    assert states[5].labels_used == 5
    assert states[-1].cycles_completed == 1
    assert states[-1].cycle == 1
    assert states[-1].since == 11


def test_the_reward_phase_waits_for_new_labels_and_says_why() -> None:
    # after cycle 0 used 5 labels, cycle 1 needs 5 + 4 = 9
    states = run(T, [[0]] * 3 + [[5]] + [[5]] * 4 + [[8]] * 5 + [[9]])
    assert [s.phase for s in states[8:13]] == ["collect"] * 5
    reason = waiting_reason(states[10], T)
    assert reason is not None
    assert "3 of rlhf_loop.min_labels=4 new" in reason
    assert states[13].phase == "reward"
    assert states[13].labels_used == 9
    assert waiting_reason(states[13], T) is None


def test_a_minority_of_lying_peers_cannot_start_the_reward_phase() -> None:
    # 5 contributions, 2 claim absurd counts: the lower median stays an honest claim
    assert agreed_labels([0, 1, 1, 10**9, 10**9]) == 1
    assert agreed_labels([None, 3, None]) == 3
    assert agreed_labels([None]) is None
    states = run(T, [[0]] * 3 + [[0, 0, 0, 10**9, 10**9]] * 3)
    assert all(s.phase == "collect" for s in states[3:])


def test_rounds_without_claims_keep_the_last_agreed_count() -> None:
    states = run(T, [[0]] * 3 + [[3], [], [None]])
    assert [s.labels for s in states[3:]] == [3, 3, 3]


def test_pretrain_rounds_zero_starts_by_collecting_and_lm_rounds_repeat_per_cycle() -> None:
    t = LoopThresholds(
        pretrain_rounds=0, lm_rounds_per_cycle=2, min_labels=1, reward_rounds=1, policy_rounds=1
    )
    assert initial_state(t).phase == "collect"
    states = run(t, [[1], [1], [1], [1], [1], [2]])
    assert [s.phase for s in states] == [
        "reward",
        "policy",
        "pretrain",
        "pretrain",
        "collect",
        "reward",
    ]


def test_advance_refuses_a_skipped_round() -> None:
    with pytest.raises(ValueError, match="round 0 cannot advance to round 2"):
        advance(LoopState(), T, 2, [])


def test_history_derives_states_from_claims_in_any_order_and_resumes_after_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "loop" / "state.json"
    h = LoopHistory(path, T)
    for r in range(1, 7):
        for claim in [5, 5, 0] if r == 6 else [0, 0, 0]:
            h.record(r, claim)
    assert h.state_after(6).phase == "reward"
    h.save()
    # a restarted node (new process) resumes the phase of its checkpoint's round, and
    # replayed rounds give the states they gave before
    h2 = LoopHistory(path, T)
    assert h2.state_after(6) == h.state_after(6)
    assert h2.state_after(4).phase == "collect"
    h2.record(7, 5)
    assert h2.state_after(7).phase == "reward"
    assert h2.state_after(7).rounds_in_phase() == 1


def test_a_peer_that_joined_mid_loop_adopts_the_claimed_state(tmp_path: Path) -> None:
    h = LoopHistory(None, T)
    claimed = LoopState(round=40, phase="policy", since=39, cycle=2, labels=12, labels_used=12)
    h.adopt(claimed)
    assert h.state_after(40) == claimed
    assert h.state_after(41).phase == "collect"  # its second policy round ended the cycle
    assert h.state_after(41).cycles_completed == 3


def test_an_unreadable_state_file_is_named_and_the_loop_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json", encoding="utf-8")
    h = LoopHistory(path, T)
    assert h.state_after(0) == initial_state(T)
    assert "unreadable loop state" in caplog.text
    assert str(path) in caplog.text


def test_loop_records_round_trip_and_refuse_garbage() -> None:
    state = LoopState(round=3, phase="collect", since=4, labels=2)
    blob = encode_record({"labels": 7, "state": state.claim()}, b"rollouts")
    header, body = decode_record(blob)
    assert header["labels"] == 7
    assert LoopState.from_claim(header["state"]) == state
    assert body == b"rollouts"
    with pytest.raises(ValueError, match="bad magic"):
        decode_record(b"garbage")
    bad = encode_record({"labels": -1, "state": state.claim()})
    with pytest.raises(ValueError, match="is not a count"):
        decode_record(bad)
    wrong = encode_record({"labels": 1, "state": {**state.claim(), "phase": "sleep"}})
    with pytest.raises(ValueError, match="phase 'sleep'"):
        decode_record(wrong)
    huge = b"RLHFLOOP1" + (10**6).to_bytes(4, "big") + b"{}"
    with pytest.raises(ValueError, match="at most 4096"):
        decode_record(huge)
    assert json.loads(json.dumps(state.claim())) == state.claim()


def test_the_loop_section_is_validated_with_the_swarm_config(tmp_path: Path) -> None:
    from swarmlm.swarm.config import SwarmRunConfig

    def run(swarm: dict[str, object]) -> SwarmRunConfig:
        return SwarmRunConfig.model_validate(
            {"data": {"path": str(tmp_path)}, "swarm": {"objective": "rlhf_loop", **swarm}}
        )

    cfg = run({"rlhf_loop": {"min_labels": 5, "grpo": {"group_size": 3}}})
    section = cfg.swarm.section()
    assert section is not None
    assert section.min_labels == 5  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r'needs swarm\.mode "diloco"'):
        run({"mode": "synchronous", "rlhf_loop": {}})
    with pytest.raises(ValueError, match="min_labels"):
        run({"rlhf_loop": {"min_labels": 0}})
    with pytest.raises(ValueError, match="polcy_rounds"):
        run({"rlhf_loop": {"polcy_rounds": 3}})

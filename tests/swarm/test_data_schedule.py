"""The swarm-agreed data schedule: every peer derives the same stage and weights from the
decided reports, and a minority of liars cannot steer them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from swarmlm.data.mixing import MixingConfig
from swarmlm.swarm.contribution import decode_contribution, encode_contribution
from swarmlm.swarm.data_schedule import AgreedDataSchedule, DataReport
from swarmlm.swarm.errors import StateSyncError

TYPES = ["code", "math", "prose"]
PRIOR = np.array([0.5, 0.3, 0.2])


def schedule(**kw: object) -> AgreedDataSchedule:
    cfg = MixingConfig(mode="online", curriculum=True, stages=5, patience=3, **kw)  # type: ignore[arg-type]
    return AgreedDataSchedule(cfg, rounds=50, types=TYPES, prior=PRIOR)


def honest(loss: float) -> DataReport:
    return DataReport(loss, (loss + 1.0, loss, loss - 0.5), (4, 4, 4))


def test_the_stage_advances_when_the_median_loss_drops() -> None:
    s = schedule(advance_drop=0.05, max_steps=40)
    assert s.stage == 0
    assert s.cap() == pytest.approx(0.05)
    for r, loss in enumerate([5.0, 4.0, 3.0, 2.0], start=1):
        s.observe(r, [honest(loss)] * 4)
    assert s.stage >= 1
    assert s.cap() > 0.05


def test_a_minority_of_liars_cannot_move_the_stage() -> None:
    """3 honest peers whose loss does not fall, 1 liar reporting a collapsing loss: with the
    median the stage stays where the honest reports keep it; a mean would have advanced it."""
    s = schedule(advance_drop=0.05, max_steps=40)
    for r in range(1, 10):
        s.observe(r, [honest(5.0), honest(5.0), honest(5.0), DataReport(0.01, (), ())])
    # the honest loss never improves: only patience (3 rounds without a new best) advances it
    patience_only = schedule(advance_drop=0.05, max_steps=40)
    for r in range(1, 10):
        patience_only.observe(r, [honest(5.0)] * 3)
    assert s.stage == patience_only.stage


def test_weights_move_towards_the_types_with_high_loss_and_ignore_a_liar() -> None:
    s = schedule()
    before = s.weights()
    assert before is not None
    liar = DataReport(1.0, (0.0, 100.0, 0.0), (4, 4, 4))  # claims math is terrible
    for r in range(1, 6):
        s.observe(r, [honest(3.0)] * 3 + [liar])
    clean = schedule()
    for r in range(1, 6):
        clean.observe(r, [honest(3.0)] * 3)
    after, ref = s.weights(), clean.weights()
    assert after is not None
    assert ref is not None
    np.testing.assert_array_equal(after, ref)  # the median of 4 with 3 identical is theirs
    assert after[0] > before[0]  # code had the highest honest loss


def test_reports_of_the_wrong_length_or_non_finite_are_ignored() -> None:
    s = schedule()
    s.observe(1, [DataReport(float("nan"), (1.0,), (1,)), DataReport(float("inf"))])
    assert s.stage == 0
    assert s.curriculum is not None
    assert s.curriculum.ema is None


def test_the_state_round_trips_exactly_through_json_scalars() -> None:
    s = schedule(advance_drop=0.05, max_steps=40)
    for r, loss in enumerate([5.0, 4.1, 3.3, 3.2, 3.25], start=1):
        s.observe(r, [honest(loss), honest(loss + 0.1), honest(loss - 0.1)])
    text = json.dumps(s.scalars(), sort_keys=True)
    other = schedule(advance_drop=0.05, max_steps=40)
    other.load(json.loads(text))
    assert other.scalars() == s.scalars()
    assert other.stage == s.stage
    np.testing.assert_array_equal(other.weights(), s.weights())  # type: ignore[arg-type]
    # and they go on identically
    for r in (6, 7):
        s.observe(r, [honest(3.0)] * 3)
        other.observe(r, [honest(3.0)] * 3)
    assert other.scalars() == s.scalars()


def test_a_state_naming_a_stage_past_the_last_is_refused() -> None:
    s = schedule()
    with pytest.raises(StateSyncError, match=r"data\.stage"):
        s.load({"data.stage": 5})


def test_without_a_schedule_nothing_is_stored() -> None:
    s = AgreedDataSchedule(MixingConfig(mode="static"), rounds=10, types=TYPES, prior=PRIOR)
    assert not s.observe(1, [honest(3.0)])
    assert s.scalars() == {}
    assert s.cap() == 1.0
    assert s.weights() is None


# -- the header field and the real workers ----------------------------------------------------


def test_the_data_report_travels_in_the_contribution_header() -> None:
    import torch

    from swarmlm.aggregation import get_codec

    payload = get_codec("none").encode(torch.zeros(4))
    report = DataReport(2.5, (3.0, 2.0, 1.5), (4, 0, 2))
    blob = encode_contribution(1, b"\1" * 32, 8, payload, data=report)
    assert decode_contribution("p", blob, 4).data == report
    assert decode_contribution("p", encode_contribution(1, b"\1" * 32, 8, payload), 4).data is None


@pytest.mark.parametrize(
    ("field", "why"),
    [
        ('{"loss": NaN, "type_loss": [], "type_rows": []}', "data.loss"),
        ('{"loss": -1.0, "type_loss": [], "type_rows": []}', "data.loss"),
        ('{"loss": 1.0, "type_loss": [1.0], "type_rows": []}', "one length"),
        ('{"loss": 1.0, "type_loss": [Infinity], "type_rows": [1]}', "non-finite"),
        ('{"loss": 1.0, "type_loss": [1.0], "type_rows": [-3]}', "non-count"),
        ('{"loss": 1.0, "type_loss": [1.0], "type_rows": [true]}', "non-count"),
        ('{"loss": 1.0}', "exactly"),
        ("[1.0]", "exactly"),
    ],
)
def test_a_malformed_data_report_is_refused_naming_the_field(field: str, why: str) -> None:
    """A Byzantine peer writes its own header: NaN, negative or ragged reports never reach
    the schedule's medians."""
    import struct

    import torch

    from swarmlm.aggregation import get_codec
    from swarmlm.swarm.errors import ContributionError

    payload = get_codec("none").encode(torch.zeros(4))
    header = (
        '{"base":"' + "01" * 32 + '","data":' + field + ',"round":1,"samples":8,'
        '"seconds":0.0,"state":"' + "01" * 32 + '"}'
    ).encode()
    blob = struct.pack("<4sBI", b"SWCT", 1, len(header)) + header + payload
    with pytest.raises(ContributionError, match=why):
        decode_contribution("p", blob, 4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from swarmlm.data.generate import generate_corpus

    out = tmp_path_factory.mktemp("sched") / "corpus"
    generate_corpus(out, size_mb=0.15, vocab_size=512, seed=1)
    return out


def test_swarm_peers_agree_on_the_stage_and_weights_and_a_joiner_adopts_them(
    corpus: Path, tmp_path: Path
) -> None:
    """Three real workers on different shards: each would advance its own curriculum from its
    own losses; here they hold one stage and one set of weights, in the state digest, and a
    peer that syncs the state blob reads the same."""
    import torch

    from swarmlm.data.mixing import MixtureLoader
    from swarmlm.swarm.simulate import LocalSwarm
    from swarmlm.swarm.worker import SwarmWorker
    from tests.swarm.conftest import peer_id, swarm_config

    before = torch.get_num_threads()
    mixing = {
        "mode": "online",
        "update_every": 1,
        "curriculum": True,
        "stages": 4,
        "patience": 1,
        "max_steps": 2,
    }

    def worker(i: int) -> SwarmWorker:
        cfg = swarm_config(corpus, tmp_path, data_shard=i, inner_steps=3, rounds=6)
        raw = cfg.model_dump(mode="json")
        raw["data"]["mixing"] = mixing
        cfg = type(cfg).model_validate(raw)
        return SwarmWorker(cfg, peer_id(i), out_dir=tmp_path / f"peer{i}")

    swarm = LocalSwarm([worker(i) for i in range(3)])
    try:
        for r in range(1, 5):
            swarm.run_round(r)
            workers = list(swarm.workers.values())
            assert len({w.engine.state_digest() for w in workers}) == 1
            stages = {w.engine.schedule.stage for w in workers}  # type: ignore[union-attr]
            assert len(stages) == 1
            caps = {w.trainer.loader.cap for w in workers}  # type: ignore[union-attr]
            assert len(caps) == 1
        first = next(iter(swarm.workers.values()))
        schedule = first.engine.schedule
        assert schedule is not None
        assert schedule.stage >= 1  # max_steps = 2 rounds per stage at the latest
        assert b'"data.stage"' in first.engine.state_blob()  # consensus state, in the digest
        loader = first.trainer.loader
        assert isinstance(loader, MixtureLoader)
        np.testing.assert_allclose(loader.weights, schedule.weights())  # type: ignore[arg-type]

        joiner = worker(7)
        assert joiner.engine.schedule is not None
        assert joiner.engine.schedule.stage == 0
        joiner.load_state(first.engine.state_blob(), first.engine.state_digest())
        assert joiner.engine.schedule.stage == schedule.stage
        assert joiner.engine.state_digest() == first.engine.state_digest()
        assert joiner.trainer.loader.cap == loader.cap  # type: ignore[union-attr]
        joiner.close()
    finally:
        swarm.close()
        torch.set_num_threads(before)

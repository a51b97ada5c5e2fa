"""Online data mixing (DoReMi/ODM) and the adaptive curriculum, alone and in the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from swarmlm.data import TokenShards
from swarmlm.data.errors import DataError
from swarmlm.data.generate import generate_corpus, read_records
from swarmlm.data.mixing import (
    AdaptiveCurriculum,
    MixingConfig,
    MixtureIndex,
    MixtureLoader,
    OnlineMixer,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mix") / "corpus"
    generate_corpus(out, size_mb=0.15, vocab_size=512, seed=1)
    return out


def _type_of_position(corpus: Path) -> tuple[np.ndarray, list[str]]:
    index = MixtureIndex.open(corpus)
    shards = TokenShards.open(corpus, "train")
    owner = np.full(len(shards), -1, dtype=np.int64)
    diff = np.zeros(len(shards))
    for r in read_records(corpus):
        if r["split"] == "train" and r["type"] in index.types:
            owner[r["start"] : r["start"] + r["tokens"]] = index.types.index(r["type"])
            diff[r["start"] : r["start"] + r["tokens"]] = r["difficulty"]
    return owner, diff  # type: ignore[return-value]


def test_rows_are_drawn_at_the_mixture_weights(corpus: Path) -> None:
    index = MixtureIndex.open(corpus)
    loader = MixtureLoader(TokenShards.open(corpus), index, batch_size=64, seq_len=16, seed=0)
    owner, _ = _type_of_position(corpus)
    w = np.zeros(len(index.types))
    w[index.types.index("code")] = 3.0
    w[index.types.index("mathematics")] = 1.0
    loader.set_weights(w)
    counts = np.zeros(len(index.types))
    for _ in range(20):
        starts, types = loader.window_starts(loader.batches)
        next(loader)
        assert (owner[starts] == types).mean() > 0.95  # windows start inside their type
        counts += np.bincount(types, minlength=len(index.types))
    frac = counts / counts.sum()
    assert frac[index.types.index("code")] == pytest.approx(0.75, abs=0.05)
    assert frac[index.types.index("technical")] == 0


def test_curriculum_cap_admits_only_easy_records(corpus: Path) -> None:
    index = MixtureIndex.open(corpus)
    loader = MixtureLoader(TokenShards.open(corpus), index, batch_size=64, seq_len=16, seed=0)
    _, diff = _type_of_position(corpus)
    loader.set_cap(0.2)
    starts = np.concatenate([loader.window_starts(k)[0] for k in range(10)])
    # the easiest record of each type is always admitted; otherwise difficulty <= cap
    assert np.quantile(diff[starts], 0.9) <= 0.25


def test_mixture_loader_resumes_with_identical_batches(corpus: Path) -> None:
    index = MixtureIndex.open(corpus)
    shards = TokenShards.open(corpus)
    a = MixtureLoader(shards, index, batch_size=4, seq_len=16, seed=5)
    for _ in range(3):
        next(a)
    a.set_cap(0.5)
    state = a.state_dict()
    expected = [next(a)[0].clone() for _ in range(3)]
    b = MixtureLoader(shards, index, batch_size=4, seq_len=16, seed=5)
    b.load_state_dict(state)
    for e in expected:
        assert np.array_equal(next(b)[0].numpy(), e.numpy())


def test_ranks_draw_disjoint_rows_of_one_global_batch(corpus: Path) -> None:
    index = MixtureIndex.open(corpus)
    shards = TokenShards.open(corpus)
    one = MixtureLoader(shards, index, batch_size=8, seq_len=16, seed=2)
    r0 = MixtureLoader(shards, index, batch_size=4, seq_len=16, seed=2, rank=0, world_size=2)
    r1 = MixtureLoader(shards, index, batch_size=4, seq_len=16, seed=2, rank=1, world_size=2)
    whole = one.window_starts(0)[0]
    assert np.array_equal(np.concatenate([r0.window_starts(0)[0], r1.window_starts(0)[0]]), whole)


def test_online_mixer_up_weights_the_type_with_excess_loss() -> None:
    types = ["a", "b", "c"]
    mixer = OnlineMixer(types, np.array([0.5, 0.3, 0.2]), MixingConfig(mode="online", eta=0.5))
    for _ in range(10):
        mixer.observe(np.array([0, 1, 2, 1]), np.array([2.0, 4.0, 2.0, 4.0]))
        w = mixer.update()
    assert w[1] > 0.3  # b had the highest loss
    assert w[1] == max(w)
    assert w.sum() == pytest.approx(1.0)
    assert min(w) >= 0.2 * 0.2 - 1e-9  # smoothing keeps every type sampled


def test_reference_losses_make_it_doremi(tmp_path: Path) -> None:
    # with a reference, only the loss *above* the reference counts: b is at its reference
    types = ["a", "b"]
    cfg = MixingConfig(mode="online", eta=0.5)
    mixer = OnlineMixer(types, np.array([0.5, 0.5]), cfg, reference={"a": 1.0, "b": 4.0})
    for _ in range(5):
        mixer.observe(np.array([0, 1]), np.array([2.0, 4.0]))
        w = mixer.update()
    assert w[0] > 0.5


def test_mixer_state_round_trips() -> None:
    cfg = MixingConfig(mode="online")
    m = OnlineMixer(["a", "b"], np.array([0.5, 0.5]), cfg)
    m.observe(np.array([0, 1]), np.array([1.0, 3.0]))
    m.update()
    m2 = OnlineMixer(["a", "b"], np.array([0.5, 0.5]), cfg)
    m2.load_state_dict(m.state_dict())
    assert np.allclose(m2.weights(), m.weights())
    with pytest.raises(DataError, match="types"):
        OnlineMixer(["a", "c"], np.array([0.5, 0.5]), cfg).load_state_dict(m.state_dict())


def test_curriculum_advances_when_the_stage_loss_drops_and_when_it_stalls() -> None:
    cfg = MixingConfig(mode="static", curriculum=True, stages=10, patience=5, advance_drop=0.1)
    cur = AdaptiveCurriculum(cfg, total_steps=10_000)
    caps = [cur.cap()]
    loss = 5.0
    for step in range(30):  # falling loss: advances on the drop
        loss *= 0.97
        if cur.observe(step, loss):
            caps.append(cur.cap())
    assert cur.stage >= 2
    assert caps == sorted(caps)
    stage = cur.stage
    for step in range(30, 60):  # flat loss: advances after `patience` steps
        cur.observe(step, loss)
    assert cur.stage > stage
    assert cur.cap() <= 1.0


def test_curriculum_is_paced_to_finish_within_the_run() -> None:
    cfg = MixingConfig(mode="static", curriculum=True, stages=100, patience=10**6, advance_drop=0.9)
    cur = AdaptiveCurriculum(cfg, total_steps=1000)
    for step in range(1000):
        cur.observe(step, 3.0 - step * 1e-6)
    assert cur.stage == 99
    assert cur.cap() == 1.0


def test_curriculum_without_a_mixture_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"needs data\.mixing\.mode"):
        MixingConfig(curriculum=True)


def test_a_prepared_corpus_cannot_be_mixed(arange_data: Path) -> None:
    with pytest.raises(DataError, match="not written by `swarmlm data generate`"):
        MixtureIndex.open(arange_data)


def test_trainer_adapts_weights_and_stage_and_resumes(corpus: Path, tmp_path: Path) -> None:
    from swarmlm.train.config import RunConfig
    from swarmlm.train.trainer import Trainer
    from tests.train.conftest import tiny_run_config

    raw = tiny_run_config(corpus, tmp_path / "run", max_steps=12, checkpoint_every=6)
    raw["data"]["mixing"] = {  # type: ignore[index]
        "mode": "online",
        "update_every": 2,
        "curriculum": True,
        "stages": 5,
        "patience": 2,
    }
    cfg = RunConfig.model_validate(raw)
    trainer = Trainer(cfg, show_progress=False)
    prior = trainer.loader.weights.copy()
    result = trainer.fit(until_step=6)
    assert np.isfinite(result.losses).all()
    assert not np.allclose(trainer.loader.weights, prior)
    assert trainer.curriculum is not None
    assert trainer.curriculum.stage >= 1
    state = (trainer.loader.state_dict(), trainer.mixer.state_dict())  # type: ignore[union-attr]

    resumed = Trainer(cfg, show_progress=False)
    resumed.resume(tmp_path / "run")
    assert resumed.loader.state_dict() == state[0]
    assert resumed.mixer.state_dict() == state[1]  # type: ignore[union-attr]
    assert resumed.curriculum.stage == trainer.curriculum.stage  # type: ignore[union-attr]

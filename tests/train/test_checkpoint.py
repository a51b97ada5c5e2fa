from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.train import checkpoint as ckpt_mod
from swarmlm.train.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _state(value: float) -> dict[str, torch.Tensor]:
    shared = torch.full((4, 3), value)
    return {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": torch.ones(3)}


def _save(run: Path, step: int, keep: int = 3) -> Path:
    trainer = {
        "optimizer": {"state": {}, "param_groups": []},
        "rng": {"torch": torch.get_rng_state()},
    }
    return save_checkpoint(run, step, _state(float(step)), trainer, {"config": {"model": {}}}, keep)


def test_round_trip_restores_tensors_aliases_and_state(tmp_path: Path) -> None:
    _save(tmp_path, 5)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 5
    assert torch.equal(ck.model_state["embed.weight"], torch.full((4, 3), 5.0))
    assert ck.model_state["lm_head.weight"] is ck.model_state["embed.weight"]
    assert torch.equal(ck.trainer_state["rng"]["torch"], torch.get_rng_state())


def test_only_the_last_k_checkpoints_are_kept_and_latest_points_to_the_newest(
    tmp_path: Path,
) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000005"


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer.pt", "state.json"])
def test_corrupt_or_truncated_files_are_refused_naming_the_file(
    tmp_path: Path, victim: str
) -> None:
    path = _save(tmp_path, 1)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint(path)


def test_a_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_a_failed_save_never_replaces_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _save(tmp_path, 1)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert load_checkpoint(tmp_path).step == 1


def test_missing_manifest_means_incomplete(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_async_checkpointer_writes_in_background_and_reports_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AsyncCheckpointer()
    trainer = {"optimizer": {}, "rng": {}}
    writer.submit(tmp_path, 3, _state(3.0), trainer, {"config": {}}, 2)
    writer.wait()
    assert load_checkpoint(tmp_path).step == 3
    monkeypatch.setattr(ckpt_mod.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    writer.submit(tmp_path, 4, _state(4.0), trainer, {"config": {}}, 2)
    with pytest.raises(CheckpointError, match="background checkpoint failed"):
        writer.wait()
    assert load_checkpoint(tmp_path).step == 3

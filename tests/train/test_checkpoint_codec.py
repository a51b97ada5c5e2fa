"""Compressed checkpoints (train.checkpoint_codec) load exactly what was saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    torch.manual_seed(0)
    emb = torch.randn(64, 16)
    model = {"emb.weight": emb, "head.weight": emb, "w": torch.randn(16, 16).to(torch.bfloat16)}
    trainer = {"optimizer": {"state": {0: {"exp_avg": torch.randn(16)}}}, "rng": torch.arange(5)}
    return model, trainer


@pytest.mark.parametrize("codec", ["zstd", "lzma", "auto"])
def test_compressed_checkpoint_loads_identically(codec: str, tmp_path: Path) -> None:
    model, trainer = _state()
    path = save_checkpoint(tmp_path, 3, model, trainer, {"config": {}}, keep=2, codec=codec)
    assert (path / "model.safetensors.swz").exists()
    assert not (path / "model.safetensors").exists()
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3
    for k, v in model.items():
        assert torch.equal(ckpt.model_state[k], v)
        assert ckpt.model_state[k].dtype == v.dtype
    assert ckpt.model_state["head.weight"] is ckpt.model_state["emb.weight"]  # alias kept
    assert torch.equal(
        ckpt.trainer_state["optimizer"]["state"][0]["exp_avg"],
        trainer["optimizer"]["state"][0]["exp_avg"],
    )  # type: ignore[index]


def test_a_corrupted_compressed_checkpoint_is_refused(tmp_path: Path) -> None:
    model, trainer = _state()
    path = save_checkpoint(tmp_path, 1, model, trainer, {"config": {}}, keep=2, codec="zlib")
    f = path / "trainer.pt.swz"
    data = bytearray(f.read_bytes())
    data[30] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"trainer\.pt\.swz fails its sha256"):
        load_checkpoint(path)


def test_unknown_checkpoint_codec_is_named(tmp_path: Path) -> None:
    model, trainer = _state()
    with pytest.raises(CheckpointError, match="unknown codec 'snappy'"):
        save_checkpoint(tmp_path, 1, model, trainer, {"config": {}}, keep=2, codec="snappy")

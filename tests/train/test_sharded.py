"""Sharded (torch.distributed.checkpoint) checkpoints load into another layout's modules."""

from __future__ import annotations

from pathlib import Path

import torch

from swarmlm.cluster.pipeline import PipelineStageModule
from swarmlm.model import ModelConfig, Transformer
from swarmlm.train.sharded import _state, load_sharded_checkpoint

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)


def _trained_model() -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 16))
    model(ids, targets=ids).loss.backward()
    opt.step()
    return model, opt


def test_last_pipeline_stage_reads_its_tied_output_layer_from_the_embedding(
    tmp_path: Path,
) -> None:
    """A tied model saves the shared matrix once (embed.weight); the last stage of a pipeline
    holds its own lm_head copy and must get the weights and AdamW moments of that matrix."""
    from torch.distributed.checkpoint.state_dict_saver import save

    model, opt = _trained_model()
    save(_state(model, opt), checkpoint_id=str(tmp_path / "dcp"))

    torch.manual_seed(1)  # different initial weights: everything must come from the file
    stage = PipelineStageModule(Transformer(CFG), range(1, 2), first=False, last=True)
    stage_opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    load_sharded_checkpoint(tmp_path / "dcp", stage, stage_opt)

    assert stage.lm_head is not None
    assert torch.equal(stage.lm_head.weight, model.embed.weight)
    assert torch.equal(stage.blocks["1"].attn.q_proj.weight, model.blocks[1].attn.q_proj.weight)
    moments = stage_opt.state[stage.lm_head.weight]["exp_avg"]
    assert torch.equal(moments, opt.state[model.embed.weight]["exp_avg"])

"""Sharded checkpoints with torch.distributed.checkpoint (DCP), readable by any layout.

A checkpoint written under a mesh layout is the usual directory (``model.safetensors`` with
full tensors, ``state.json``, ``config.json``, ``trainer.pt``, ``manifest.json``) plus
``dcp/``: every rank's shards of the model and of the optimizer, keyed by parameter name.
Loading asks DCP for exactly the tensors the current layout holds (DTensor shards under
tp/FSDP2/ep, a subset of names on a pipeline stage, whole tensors in one process), so a run
saved under tp=2 resumes under dp=2 or in one process, weights and AdamW moments included.
The optimizer state is flattened (``state.<param>.<key>``), so stages with different
parameter lists never collide on a shared ``param_groups`` entry.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from swarmlm.train.checkpoint import CheckpointError, save_checkpoint
from swarmlm.train.parallel import SingleProcess

_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM),
    }


def full_model_state(dcp_dir: Path) -> dict[str, Tensor]:
    """Whole tensors of the model part of a DCP directory, read by this process alone."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="swarmlm-dcp-") as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(dcp_dir), str(out))
        everything = torch.load(out, map_location="cpu", weights_only=True)
    model: dict[str, Tensor] = everything["model"]
    return model


def save_sharded_checkpoint(
    parallel: SingleProcess,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path | None:
    """Collective: every rank must call it. Returns the checkpoint path on rank 0."""
    staging = run_dir / "checkpoints" / f".dcp-step-{step:08d}"
    if parallel.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    parallel.barrier()
    dcp_save(_state(model, optimizer), checkpoint_id=str(staging))
    parallel.barrier()
    path: Path | None = None
    error: BaseException | None = None
    if parallel.is_main:
        try:
            full = full_model_state(staging)
            path = save_checkpoint(
                run_dir, step, full, trainer_state, state, keep, sharded_dir=staging
            )
        except BaseException as exc:  # the others must still leave the barrier
            error = exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    parallel.barrier()
    if error is not None:
        raise error
    return path


# Tied embeddings are one parameter (saved once, as embed.weight) except on the last pipeline
# stage, which holds its own lm_head copy: read that copy from embed.weight when it is missing.
_ALIASES = {"lm_head.weight": "embed.weight"}


def _alias_missing(state: dict[str, Any], saved: set[str]) -> list[tuple[str, str, str]]:
    """Rename keys the checkpoint lacks to their tied twin; returns what to rename back."""
    moved = []
    for part in ("model", "optim"):
        section = state[part]
        for key in list(section):
            if f"{part}.{key}" in saved:
                continue
            for name, twin in _ALIASES.items():
                if name not in key:
                    continue
                alias = key.replace(name, twin)
                if f"{part}.{alias}" in saved and alias not in section:
                    section[alias] = section.pop(key)
                    moved.append((part, alias, key))
    return moved


def load_sharded_checkpoint(
    dcp_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Fill ``model`` and ``optimizer`` (any layout, or one process) from a DCP directory."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    state = _state(model, optimizer)
    saved = set(FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)
    moved = _alias_missing(state, saved)
    try:
        dcp_load(state, checkpoint_id=str(dcp_dir))
    except Exception as exc:
        raise CheckpointError(f"{dcp_dir}: cannot load into this layout: {exc}") from exc
    for part, alias, key in moved:
        state[part][key] = state[part].pop(alias)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIM)

"""Parallel layouts: which ranks split what, checked before any process group exists.

A layout names four degrees: ``dp`` (data parallel, FSDP2 or DDP), ``tp`` (tensor + sequence
parallel), ``pp`` (pipeline stages) and ``ep`` (expert parallel, MoE only). Their product is
the world size. Ranks are laid out on a :class:`~torch.distributed.device_mesh.DeviceMesh`
of shape ``(pp, dp, ep, tp)`` (tp innermost, so a tensor-parallel group is adjacent ranks, as
in torchtitan). Expert-parallel ranks read different data, like data-parallel ranks: the
data-parallel degree seen by the loader is ``dp * ep``.

Every check here is pure (numbers in, message out) so that a bad layout fails on every rank
with the same message before anything could wait on a peer.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmlm.model import ModelConfig

DIMS = ("pp", "dp", "ep", "tp")


class LayoutError(ValueError):
    """A layout that cannot run: the message names the numbers at fault."""


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.ep

    @property
    def data_parallel(self) -> int:
        """How many different slices of each global batch are read at once."""
        return self.dp * self.ep

    @property
    def is_plain_dp(self) -> bool:
        return self.tp == self.pp == self.ep == 1

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "ep": self.ep, "tp": self.tp}

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))]
        parts.append(f"ep={self.ep}")
        return ",".join(p for p in parts if not p.endswith("=1")) or "dp=1"


def parse_layout(text: str) -> dict[str, int | None]:
    """``"dp=2,tp=2"`` -> ``{"dp": 2, "tp": 2}``; ``dp=auto`` -> ``{"dp": None}``."""
    out: dict[str, int | None] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DIMS:
            raise LayoutError(
                f"--parallel {text!r}: expected comma-separated dp=N, tp=N, pp=N, ep=N; "
                f"got {item!r}"
            )
        if key in out:
            raise LayoutError(f"--parallel {text!r}: {key} given twice")
        if value.strip() == "auto" and key == "dp":
            out[key] = None
            continue
        try:
            number = int(value)
        except ValueError:
            raise LayoutError(f"--parallel {text!r}: {key}={value!r} is not an integer") from None
        if number < 1:
            raise LayoutError(f"--parallel {text!r}: {key}={number} must be >= 1")
        out[key] = number
    return out


def resolve_layout(
    *, dp: int | None, tp: int, pp: int, ep: int, world_size: int, model: ModelConfig
) -> Layout:
    """The layout for ``world_size`` ranks, or :class:`LayoutError` naming what does not fit.

    ``dp=None`` takes whatever the other degrees leave of the world size.
    """
    others = tp * pp * ep
    if dp is None:
        if world_size % others != 0:
            raise LayoutError(
                f"tp={tp} x pp={pp} x ep={ep} = {others} does not divide the world size "
                f"{world_size}"
            )
        dp = world_size // others
    layout = Layout(dp=dp, tp=tp, pp=pp, ep=ep)
    if layout.world_size != world_size:
        raise LayoutError(
            f"dp={dp} x tp={tp} x pp={pp} x ep={ep} = {layout.world_size} ranks, but the world "
            f"size is {world_size} (torchrun --nproc-per-node x nodes): make the product equal"
        )
    check_model_fits(layout, model)
    return layout


def check_model_fits(layout: Layout, model: ModelConfig) -> None:
    if layout.tp > 1:
        if model.n_heads % layout.tp != 0:
            raise LayoutError(
                f"tp={layout.tp} must divide model.n_heads={model.n_heads} (each rank holds "
                "whole attention heads)"
            )
        if model.kv_heads % layout.tp != 0:
            raise LayoutError(
                f"tp={layout.tp} must divide the KV heads (model.n_kv_heads={model.kv_heads}): "
                "GQA keeps each query head's KV head on its rank"
            )
        if model.ffn_dim % layout.tp != 0:
            raise LayoutError(f"tp={layout.tp} must divide the feed-forward width {model.ffn_dim}")
        if model.vocab_size % layout.tp != 0:
            raise LayoutError(
                f"tp={layout.tp} must divide model.vocab_size={model.vocab_size} (the embedding "
                "and output layer are sharded over the vocabulary)"
            )
        if model.pos_encoding != "rope":
            raise LayoutError(
                f"tp={layout.tp} needs model.pos_encoding='rope' (got {model.pos_encoding!r})"
            )
    if layout.pp > 1:
        if layout.pp > model.n_layers:
            raise LayoutError(
                f"pp={layout.pp} pipeline stages but model.n_layers={model.n_layers}: each "
                "stage needs at least one block"
            )
        if model.pos_encoding != "rope":
            raise LayoutError(
                f"pp={layout.pp} needs model.pos_encoding='rope' (got {model.pos_encoding!r})"
            )
    if layout.ep > 1:
        if not model.is_moe:
            raise LayoutError(
                f"ep={layout.ep} needs an MoE model (model.n_experts={model.n_experts})"
            )
        if model.n_experts % layout.ep != 0:
            raise LayoutError(
                f"ep={layout.ep} must divide model.n_experts={model.n_experts} (each rank holds "
                "the same number of experts)"
            )
        if layout.tp > 1 or layout.pp > 1:
            raise LayoutError(
                f"ep={layout.ep} combines with dp only (got tp={layout.tp}, pp={layout.pp})"
            )


def stage_blocks(n_layers: int, pp: int) -> list[range]:
    """Contiguous block ranges per pipeline stage, the first stages one longer when uneven."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out

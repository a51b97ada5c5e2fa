"""Layouts are checked before any process group exists; each refusal names the numbers."""

from __future__ import annotations

import pytest

from swarmlm.cluster.layout import LayoutError, parse_layout, resolve_layout, stage_blocks
from swarmlm.model import ModelConfig

DENSE = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
MOE = DENSE.model_copy(update={"n_experts": 4})


def test_parse_reads_degrees_and_auto() -> None:
    assert parse_layout("dp=2,tp=2") == {"dp": 2, "tp": 2}
    assert parse_layout(" pp=2 , dp=auto ") == {"pp": 2, "dp": None}
    for bad, words in [
        ("tp2", "tp2"),
        ("xp=2", "xp=2"),
        ("tp=two", "tp='two'"),
        ("tp=0", "tp=0"),
        ("tp=2,tp=2", "tp given twice"),
    ]:
        with pytest.raises(LayoutError, match=words):
            parse_layout(bad)


def test_dp_takes_the_rest_of_the_world() -> None:
    layout = resolve_layout(dp=None, tp=2, pp=1, ep=1, world_size=4, model=DENSE)
    assert (layout.dp, layout.tp, layout.data_parallel) == (2, 2, 2)
    ep = resolve_layout(dp=None, tp=1, pp=1, ep=2, world_size=4, model=MOE)
    assert (ep.dp, ep.ep, ep.data_parallel) == (2, 2, 4)


@pytest.mark.parametrize(
    ("degrees", "world", "model", "message"),
    [
        (
            {"dp": 2, "tp": 2},
            2,
            DENSE,
            r"dp=2 x tp=2 x pp=1 x ep=1 = 4 ranks, but the world size is 2",
        ),
        (
            {"dp": None, "tp": 3},
            4,
            DENSE,
            r"tp=3 x pp=1 x ep=1 = 3 does not divide the world size 4",
        ),
        ({"tp": 8}, 8, DENSE, r"tp=8 must divide model.n_heads=4"),
        ({"tp": 4}, 4, DENSE, r"tp=4 must divide the KV heads \(model.n_kv_heads=2\)"),
        ({"pp": 4}, 4, DENSE, r"pp=4 pipeline stages but model.n_layers=2"),
        ({"ep": 3}, 3, MOE, r"ep=3 must divide model.n_experts=4"),
        ({"ep": 2}, 2, DENSE, r"ep=2 needs an MoE model \(model.n_experts=0\)"),
        ({"ep": 2, "tp": 2}, 4, MOE, r"ep=2 combines with dp only \(got tp=2, pp=1\)"),
    ],
)
def test_bad_layouts_name_the_numbers(
    degrees: dict[str, int | None], world: int, model: ModelConfig, message: str
) -> None:
    args: dict[str, int | None] = {"dp": 1, "tp": 1, "pp": 1, "ep": 1, **degrees}
    with pytest.raises(LayoutError, match=message):
        resolve_layout(
            dp=args["dp"],
            tp=args["tp"] or 1,
            pp=args["pp"] or 1,
            ep=args["ep"] or 1,
            world_size=world,
            model=model,
        )


def test_tp_pp_and_moe_under_tp_or_pp_are_accepted() -> None:
    for model in (DENSE, MOE):
        layout = resolve_layout(dp=None, tp=2, pp=2, ep=1, world_size=4, model=model)
        assert (layout.pp, layout.tp, layout.dp) == (2, 2, 1)
    assert resolve_layout(dp=2, tp=2, pp=1, ep=1, world_size=4, model=MOE).data_parallel == 2


def test_stages_cover_every_block_once() -> None:
    assert stage_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert [b for r in stage_blocks(7, 3) for b in r] == list(range(7))

"""Parameter layout, outer optimizers and wire formats: pure functions, no trainer."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from swarmlm.aggregation import get_codec
from swarmlm.swarm.batching import round_time_budget
from swarmlm.swarm.contribution import decode_contribution, encode_contribution
from swarmlm.swarm.errors import ContributionError, StateSyncError
from swarmlm.swarm.outer import FlatAdamW, NesterovOuter
from swarmlm.swarm.params import ParamLayout, flatten_params, load_flat_params, params_sha256
from swarmlm.swarm.state import StateBlob, decode_state, encode_state, state_digest


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_layout_is_sorted_by_name_and_counts_tied_weights_once() -> None:
    layout = ParamLayout.of(_Tied())
    assert list(layout.names) == sorted(layout.names)
    assert layout.numel == 10 * 4 + 4 + 4
    assert layout.matrix_mask().sum().item() == 40


def test_flat_params_round_trip_and_hash_tracks_every_bit() -> None:
    torch.manual_seed(0)
    a, b = _Tied(), _Tied()
    layout = ParamLayout.of(a)
    flat = flatten_params(a, layout)
    load_flat_params(b, layout, flat)
    assert params_sha256(flatten_params(b, layout)) == params_sha256(flat)
    bumped = flat.clone()
    bumped[7] = torch.nextafter(bumped[7], torch.tensor(10.0))
    assert params_sha256(bumped) != params_sha256(flat)


def test_nesterov_outer_matches_torch_sgd() -> None:
    torch.manual_seed(0)
    p = torch.randn(50)
    ref = nn.Parameter(p.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    outer = NesterovOuter(0.7, 0.9)
    for _ in range(5):
        g = torch.randn(50)
        ref.grad = g.clone()
        sgd.step()
        outer.step(p, g)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-6)


def test_flat_adamw_matches_torch_adamw_with_matrix_only_decay() -> None:
    torch.manual_seed(0)
    w, bias = torch.randn(6, 5), torch.randn(5)
    rw, rb = nn.Parameter(w.clone()), nn.Parameter(bias.clone())
    ref = torch.optim.AdamW(
        [{"params": [rw], "weight_decay": 0.1}, {"params": [rb], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )  # fmt: skip
    mask = torch.cat([torch.ones(30), torch.zeros(5)])
    flat = torch.cat([w.reshape(-1), bias])
    opt = FlatAdamW((0.9, 0.95), 1e-8, 0.1, mask)
    for _ in range(4):
        g = torch.randn(35)
        rw.grad, rb.grad = g[:30].view(6, 5).clone(), g[30:].clone()
        ref.step()
        opt.step(flat, g, 1e-2)
    torch.testing.assert_close(flat, torch.cat([rw.detach().reshape(-1), rb.detach()]))


def test_contribution_round_trips_through_its_codec() -> None:
    update = torch.randn(300)
    payload = get_codec("int8").encode(update)
    data = encode_contribution(3, b"\x01" * 32, 128, payload)
    c = decode_contribution("ab" * 32, data, 300)
    assert (c.round, c.state_digest, c.samples) == (3, b"\x01" * 32, 128)
    assert (c.update - update).abs().max() <= update.abs().max() / 100


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:5], "shorter than the header"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:9] + b"[" + d[10:], "header"),
        (lambda d: d[:-3], "update payload"),
    ],
)
def test_malformed_contribution_is_refused_naming_the_peer(mutate: object, reason: str) -> None:
    data = encode_contribution(1, b"\x02" * 32, 1, get_codec("none").encode(torch.ones(8)))
    with pytest.raises(ContributionError, match=f"peer {'cd' * 6}.*{reason}"):
        decode_contribution("cd" * 32, mutate(data), 8)  # type: ignore[operator]


def test_contribution_of_the_wrong_size_is_refused() -> None:
    data = encode_contribution(1, b"\x02" * 32, 1, get_codec("none").encode(torch.ones(8)))
    with pytest.raises(ContributionError, match="8 values, the model has 9"):
        decode_contribution("cd" * 32, data, 9)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=399))
def test_contribution_decoder_never_crashes_on_arbitrary_bytes(junk: bytes, cut: int) -> None:
    valid = encode_contribution(1, b"\x03" * 32, 4, get_codec("int8").encode(torch.ones(16)))
    for data in (junk, valid[:cut] + junk, valid[: min(cut, len(valid))]):
        with contextlib.suppress(ContributionError):
            decode_contribution("ef" * 32, data, 16)


def _blob() -> StateBlob:
    tensors = {"params": torch.arange(6.0), "outer.momentum": torch.zeros(0)}
    return StateBlob(4, "diloco", [["w", [2, 3]]], tensors, {"seen.aa": 3}, {"aa": 0.75})


def test_state_blob_round_trips_and_is_canonical() -> None:
    a, b = encode_state(_blob()), encode_state(_blob())
    assert a == b
    assert state_digest(a) == state_digest(b)
    st_ = decode_state(a)
    assert st_.round == 4
    assert st_.reputation == {"aa": 0.75}
    assert st_.scalars == {"seen.aa": 3}
    torch.testing.assert_close(st_.tensors["params"], torch.arange(6.0))


def test_truncated_or_padded_state_blob_is_refused() -> None:
    blob = encode_state(_blob())
    with pytest.raises(StateSyncError, match="runs past the end"):
        decode_state(blob[:-1])
    with pytest.raises(StateSyncError, match="trailing bytes"):
        decode_state(blob + b"\0")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_state_decoder_never_crashes_on_arbitrary_bytes(junk: bytes, cut: int) -> None:
    blob = encode_state(_blob())
    for data in (junk, blob[:cut] + junk):
        with contextlib.suppress(StateSyncError):
            decode_state(data)


def test_round_budget_targets_the_swarm_total_and_ignores_a_lying_minority() -> None:
    honest = {f"p{i}": (100, 1.0) for i in range(3)}
    assert round_time_budget(800, {**honest, "p3": (100, 1.0)}) == pytest.approx(2.0)
    liar = {**honest, "p3": (10**9, 0.001)}  # claims to be a million times faster
    assert round_time_budget(800, liar) == pytest.approx(2.0)
    assert round_time_budget(800, {}) is None
    assert round_time_budget(800, {"p0": (0, 0.0)}) is None


def test_contribution_carries_samples_and_compute_seconds() -> None:
    payload = get_codec("none").encode(torch.ones(4))
    c = decode_contribution(
        "ab" * 32, encode_contribution(2, b"\x01" * 32, 64, payload, None, 1.23456), 4
    )
    assert (c.samples, c.seconds, c.base_digest) == (64, 1.235, b"\x01" * 32)

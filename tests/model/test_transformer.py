"""Behaviour of the transformer a user relies on: causality, cache exactness, attention
patterns against independent dense references, GQA/MoE equivalences, checkpointing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from swarmlm.model import BlockSparseConfig, ModelConfig, Transformer
from swarmlm.model.moe import MoEFeedForward

SMALL = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)

VARIANTS = {
    "dense": {},
    "mha": {"n_kv_heads": None},
    "mqa": {"n_kv_heads": 1},
    "sliding_window": {"sliding_window": 5},
    "block_sparse": {
        "block_sparse": BlockSparseConfig(block_size=4, local_blocks=2, global_stride=3)
    },
    "moe": {"n_experts": 4, "top_k": 2},
    "learned_layernorm_gelu": {"pos_encoding": "learned", "norm": "layernorm", "ffn": "gelu"},
    "sinusoidal_untied": {"pos_encoding": "sinusoidal", "tie_embeddings": False},
}


def make(**overrides: object) -> Transformer:
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_never_change_earlier_logits(variant: str) -> None:
    model = make(**VARIANTS[variant])
    x = torch.randint(0, 61, (2, 24))
    y = x.clone()
    y[:, 13:] = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward_step_by_step(variant: str) -> None:
    model = make(**VARIANTS[variant])
    x = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, 64)
        pieces = [model(x[:, :9], cache=cache).logits]
        pieces += [model(x[:, t : t + 1], cache=cache).logits for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-5)


def test_cached_decoding_in_uneven_chunks_equals_full_forward() -> None:
    model = make(sliding_window=6)
    x = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(1, 64)
        bounds = [0, 3, 11, 12, 20, 33, 40]  # chunks both shorter and longer than the window
        pieces = [model(x[:, a:b], cache=cache).logits for a, b in itertools.pairwise(bounds)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-5)


def test_sliding_window_cache_memory_is_bounded_by_the_window() -> None:
    windowed, dense = make(sliding_window=8), make()
    assert (
        windowed.new_cache(1, 4096).memory_bytes() * 512 == dense.new_cache(1, 4096).memory_bytes()
    )


def test_dense_cache_refuses_overflow_with_a_clear_error() -> None:
    model = make()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def reference_attention_model_logits(model: Transformer, x: torch.Tensor, allowed) -> torch.Tensor:
    """Run ``model`` with attention recomputed by an explicit masked softmax (no SDPA)."""
    cfg = model.cfg
    seq = x.shape[1]
    mask = torch.tensor([[allowed(i, j) for j in range(seq)] for i in range(seq)])
    originals = []

    def dense_attn(self, h, rope, _mask, cache=None):
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = rope
        half = cfg.head_dim // 2
        rot = lambda z: torch.cat((-z[..., half:], z[..., :half]), -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        rep = cfg.n_heads // cfg.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    for block in model.blocks:
        originals.append(block.attn.forward)
        block.attn.forward = dense_attn.__get__(block.attn)
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        for block, fwd in zip(model.blocks, originals, strict=False):
            block.attn.forward = fwd


def test_sliding_window_equals_dense_masked_reference() -> None:
    w = 7
    model = make(sliding_window=w)
    x = torch.randint(0, 61, (2, 40))
    ref = reference_attention_model_logits(model, x, lambda i, j: j <= i and i - j < w)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=2e-5)


def test_block_sparse_equals_dense_masked_reference() -> None:
    bs = BlockSparseConfig(block_size=4, local_blocks=2, global_stride=3)
    model = make(block_sparse=bs)
    x = torch.randint(0, 61, (2, 48))

    def allowed(i: int, j: int) -> bool:
        qb, kb = i // 4, j // 4
        return j <= i and (qb - kb < 2 or kb % 3 == 0)

    ref = reference_attention_model_logits(model, x, allowed)
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    # And the pattern really is sparse: it differs from full causal attention.
    full = reference_attention_model_logits(model, x, lambda i, j: j <= i)
    assert (out - full).abs().max() > 1e-4


def test_gqa_with_n_kv_heads_equal_to_n_heads_is_mha() -> None:
    model = make(n_kv_heads=4)
    x = torch.randint(0, 61, (2, 20))
    ref = reference_attention_model_logits(model, x, lambda i, j: j <= i)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=2e-5)


def test_gqa_equals_mha_with_key_value_heads_shared_per_group() -> None:
    gqa = make(n_kv_heads=2)
    mha = make(n_kv_heads=4)
    state = gqa.state_dict()
    hd = gqa.cfg.head_dim
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(2, hd, -1)
            state[name] = heads.repeat_interleave(2, 0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=0, atol=2e-5)


def test_moe_with_one_expert_and_top1_equals_the_dense_ffn() -> None:
    dense = make()
    moe = make(n_experts=1, top_k=1)
    state = dense.state_dict()
    moe_state = moe.state_dict()
    for name in moe_state:
        if ".ffn.w_" in name:
            moe_state[name] = state[name + ".weight"].unsqueeze(0)
        elif ".ffn.router" not in name:
            moe_state[name] = state[name]
    moe.load_state_dict(moe_state)
    x = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (8, 2), (5, 3)])
def test_aux_loss_equals_its_analytic_value_for_a_uniform_router(
    n_experts: int, top_k: int
) -> None:
    coef = 0.01
    model = Transformer(
        ModelConfig(**{**SMALL, "n_experts": n_experts, "top_k": top_k, "moe_aux_loss_coef": coef})
    ).train()
    for block in model.blocks:
        torch.nn.init.zeros_(block.ffn.router.weight)  # every expert equally likely
    x = torch.randint(0, 61, (3, 16))
    out = model(x, targets=x)
    # n_experts * sum_e f_e * (1 / n_experts) = sum_e f_e = 1 per layer.
    torch.testing.assert_close(out.aux_loss, torch.tensor(coef * SMALL["n_layers"]))
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_router_z_loss_is_added_when_enabled() -> None:
    cfg = {**SMALL, "n_experts": 4, "top_k": 2, "moe_aux_loss_coef": 0.0, "moe_z_loss_coef": 0.5}
    model = Transformer(ModelConfig(**cfg)).train()
    for block in model.blocks:
        torch.nn.init.zeros_(block.ffn.router.weight)
    x = torch.randint(0, 61, (2, 8))
    # Zero logits: logsumexp = log(4) for every token.
    expected = 0.5 * math.log(4) ** 2 * SMALL["n_layers"]
    torch.testing.assert_close(model(x, targets=x).aux_loss, torch.tensor(expected))


def test_moe_dispatch_matches_a_per_token_reference_and_counts_utilisation() -> None:
    model = make(n_experts=4, top_k=2)
    ffn = model.blocks[0].ffn
    assert isinstance(ffn, MoEFeedForward)
    h = torch.randn(2, 9, SMALL["d_model"])
    out, _ = ffn(h)
    flat = h.reshape(-1, h.shape[-1])
    probs = torch.softmax(ffn.router(flat), -1)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = torch.topk(probs[t], 2)
        for w, e in zip(top.values / top.values.sum(), top.indices, strict=False):
            a = F.silu(flat[t] @ ffn.w_gate[e].t()) * (flat[t] @ ffn.w_up[e].t())
            expected[t] += w * (a @ ffn.w_down[e].t())
    torch.testing.assert_close(out.reshape(-1, h.shape[-1]), expected, rtol=1e-5, atol=1e-5)
    stats = ffn.utilisation()
    assert int(ffn.expert_counts.sum()) == 18 * 2
    assert sum(stats["share"]) == pytest.approx(1.0)


def test_moe_grouped_bf16_experts_give_the_per_expert_loop_outputs_and_gradients() -> None:
    # Under bf16 autocast the experts run as F.grouped_mm (rows and weights cast once); the
    # per-expert loop is the reference. One token top-2 of 4 leaves two experts empty.
    for shape in ((2, 9), (1, 1)):
        grads = []
        for grouped in (True, False):
            torch.manual_seed(0)
            ffn = make(n_experts=4, top_k=2).blocks[0].ffn
            assert isinstance(ffn, MoEFeedForward)
            ffn.grouped_bf16 = grouped
            gen = torch.Generator().manual_seed(1)
            h = torch.randn(*shape, SMALL["d_model"], generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = ffn(h)
            assert out.dtype == torch.bfloat16
            out.float().square().sum().backward()
            grads.append((out.float(), ffn.w_up.grad, ffn.w_gate.grad, ffn.router.weight.grad))
        for got, want in zip(grads[0], grads[1], strict=True):
            assert got is not None
            assert want is not None
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_checkpointed_and_plain_blocks_give_the_same_gradients() -> None:
    plain = Transformer(ModelConfig(**{**SMALL, "n_experts": 4})).train()
    ckpt = Transformer(ModelConfig(**{**SMALL, "n_experts": 4, "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    x = torch.randint(0, 61, (2, 16))
    plain(x, targets=x).loss.backward()
    ckpt(x, targets=x).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=False):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


def test_dropout_is_active_in_training_and_off_in_eval() -> None:
    model = Transformer(ModelConfig(**{**SMALL, "attn_dropout": 0.3, "resid_dropout": 0.3}))
    x = torch.randint(0, 61, (2, 16))
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits)


def test_left_padding_with_attention_mask_gives_the_unpadded_logits() -> None:
    model = make()
    x = torch.randint(1, 61, (1, 10))
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), x), 1)
    mask = torch.cat((torch.zeros(1, 4), torch.ones(1, 10)), 1).long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits[:, 4:], model(x).logits, rtol=0, atol=2e-5
        )


def test_loss_ignores_targets_marked_minus_100() -> None:
    model = make()
    x = torch.randint(0, 61, (2, 12))
    targets = x.clone()
    targets[:, :6] = -100
    out = model(x, targets=targets)
    expected = F.cross_entropy(out.logits[:, 6:].reshape(-1, 61), x[:, 6:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_tied_embeddings_share_storage_and_untied_do_not() -> None:
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 61 * 32


def test_residual_projections_get_scaled_initialisation() -> None:
    model = Transformer(ModelConfig(d_model=256, n_layers=8, n_heads=4))
    std_in = model.blocks[0].attn.q_proj.weight.std().item()
    std_out = model.blocks[0].attn.o_proj.weight.std().item()
    assert std_in == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_parameter_and_flop_counts() -> None:
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688)
    model = Transformer(cfg)
    per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688 + 2 * 256
    assert model.num_parameters() == 2048 * 256 + 4 * per_layer + 256
    assert model.num_parameters(exclude_embeddings=True) == 4 * per_layer + 256
    forward = 2 * (4 * per_layer + 256 + 2048 * 256) + 4 * 4 * 256 * 256
    assert model.flops_per_token(256, training=False) == forward
    assert model.flops_per_token(256) == 3 * forward
    moe = Transformer(cfg.model_copy(update={"n_experts": 8, "top_k": 2}))
    assert moe.num_parameters(active=True) < moe.num_parameters()


def test_learned_positions_refuse_sequences_beyond_max_seq_len() -> None:
    model = make(pos_encoding="learned", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rope_positions_extend_past_max_seq_len() -> None:
    model = make(max_seq_len=8)
    x = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(1, 32)
        steps = [model(x[:, :4], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(4, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 30, "n_heads": 4}, "n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"n_experts": 2, "top_k": 3}, "top_k"),
        ({"d_model": 24, "n_heads": 8}, "pos_encoding"),
        ({"sliding_window": 4, "block_sparse": BlockSparseConfig()}, "block_sparse"),
        ({"n_layers": 0}, "n_layers"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_configs_give_errors_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ModelConfig(**overrides)

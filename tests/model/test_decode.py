"""The fast decode step (fused, transposed weight snapshot) against the module path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from swarmlm.model import BlockSparseConfig, ModelConfig, Transformer
from swarmlm.model.decode import FastDecoder
from swarmlm.model.generate import generate, left_pad

BASE: dict[str, Any] = dict(
    vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
)

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-rope": {},
    "mha": {"n_kv_heads": None},
    "mqa": {"n_kv_heads": 1},
    "sliding-window-ring-wraps": {"sliding_window": 5},
    "block-sparse": {"block_sparse": BlockSparseConfig(block_size=2, local_blocks=2)},
    "learned-layernorm-gelu-bias": {
        "pos_encoding": "learned",
        "norm": "layernorm",
        "ffn": "gelu",
        "bias": True,
    },
    "sinusoidal-untied": {"pos_encoding": "sinusoidal", "tie_embeddings": False},
}


def _model(extra: dict[str, Any], seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **extra}))
    # Non-trivial weights everywhere (biases and norm gains included), so a mistake in any
    # of them changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _step_by_step(
    model: Transformer, prompts: list[list[int]], feed: list[list[int]], *, compiled: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill two caches with ``prompts``, then feed the same tokens through the module path
    and through FastDecoder; returns both logit sequences."""
    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    n = len(feed[0])
    with torch.inference_mode():
        cache_a = model.new_cache(len(prompts), ids.shape[1] + n)
        cache_b = model.new_cache(len(prompts), ids.shape[1] + n)
        padded = not bool(mask.all())
        for cache in (cache_a, cache_b):
            model(ids, attention_mask=mask if padded else None, cache=cache)
        decoder = FastDecoder(model, cache_b, compiled=compiled, max_steps=n)
        ref, fast = [], []
        for t in range(n):
            token = torch.tensor([row[t] for row in feed])
            ref.append(model(token[:, None], cache=cache_a, num_logits_to_keep=1).logits[:, -1])
            fast.append(decoder.step(token))
    return ref, fast


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_decode_step_gives_the_module_paths_logits(name: str) -> None:
    model = _model(CONFIGS[name])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]  # left padding in the batch
    feed = [[(7 * t + r) % 50 for t in range(12)] for r in range(3)]
    ref, fast = _step_by_step(model, prompts, feed, compiled=False)
    for t, (a, b) in enumerate(zip(ref, fast, strict=True)):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=f"{name}: step {t}")


def test_unpadded_batch_one_decode_matches_the_module_path() -> None:
    model = _model({})
    ref, fast = _step_by_step(model, [[1, 2, 3, 4]], [[9, 8, 7, 6, 5, 4, 3, 2]], compiled=False)
    for a, b in zip(ref, fast, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


@pytest.mark.timeout(300)
def test_compiled_decode_gives_the_same_greedy_tokens_as_the_module_path() -> None:
    model = _model({})
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    compiled = generate(model, prompts, max_new_tokens=20, decode="compiled")
    module = generate(model, prompts, max_new_tokens=20, decode="module")
    assert compiled.sequences == module.sequences
    for a, b in zip(compiled.logprobs, module.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("name", ["gqa-rope", "sliding-window-ring-wraps", "block-sparse"])
def test_fast_generate_gives_the_module_paths_tokens_and_logprobs(name: str) -> None:
    model = _model(CONFIGS[name], seed=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    for kwargs in ({}, {"do_sample": True, "seed": 7, "top_k": 10, "repetition_penalty": 1.3}):
        fast = generate(model, prompts, max_new_tokens=15, decode="fast", **kwargs)
        module = generate(model, prompts, max_new_tokens=15, decode="module", **kwargs)
        assert fast.sequences == module.sequences, kwargs
        for a, b in zip(fast.logprobs, module.logprobs, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_mixture_of_experts_models_generate_through_the_module_path() -> None:
    model = _model({"n_experts": 4, "top_k": 2})
    assert not FastDecoder.supports(model.cfg)
    fast = generate(model, [[1, 2, 3]], max_new_tokens=5, decode="fast")
    module = generate(model, [[1, 2, 3]], max_new_tokens=5, decode="module")
    assert fast.sequences == module.sequences
    with torch.inference_mode(), pytest.raises(ValueError, match="n_experts"):
        FastDecoder(model, model.new_cache(1, 8))


def test_fast_decode_refuses_positions_past_learned_max_seq_len() -> None:
    model = _model({"pos_encoding": "learned", "max_seq_len": 8})
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=6, decode="fast")


def test_fast_decode_refuses_a_full_cache() -> None:
    model = _model({})
    with torch.inference_mode():
        cache = model.new_cache(1, 3)
        model(torch.tensor([[1, 2]]), cache=cache)
        decoder = FastDecoder(model, cache)
        decoder.step(torch.tensor([3]))
        with pytest.raises(ValueError, match="KV cache full"):
            decoder.step(torch.tensor([4]))


def test_an_unknown_decode_mode_names_the_field() -> None:
    with pytest.raises(ValidationError, match="decode"):
        generate(_model({}), [[1]], decode="graph")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 63, 64, 300])
def test_fused_projection_equals_the_separate_layers(bias: bool, rows: int) -> None:
    from swarmlm.model.layers import fused_linear

    layers = tuple(torch.nn.Linear(16, n, bias=bias) for n in (16, 8, 8))
    x = torch.randn(rows, 16, requires_grad=True)
    fused = fused_linear(x, layers)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(fused, separate)
    fused_grads = torch.autograd.grad(fused.square().sum(), [x, layers[1].weight])
    separate_grads = torch.autograd.grad(separate.square().sum(), [x, layers[1].weight])
    for a, b in zip(fused_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b)

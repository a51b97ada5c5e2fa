"""Generation behaviour: greedy/sampling/beam search through the KV cache."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from swarmlm.model import ModelConfig, Transformer
from swarmlm.model.generate import (
    GenerationConfig,
    beam_search,
    filter_top_k_top_p,
    generate,
)

CFG = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return _varied(Transformer(ModelConfig(**CFG)))


def _varied(m: Transformer) -> Transformer:
    """Untie and widen the output layer so next-token distributions are neither flat nor
    stuck repeating the last token (as a freshly initialised tied model is)."""
    m.lm_head.weight = torch.nn.Parameter(torch.randn_like(m.lm_head.weight) * 0.3)
    return m.eval()


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_equals_argmax_over_full_forward_passes(model: Transformer) -> None:
    out = generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=12)
    assert out.sequences[0] == greedy_without_cache(model, [3, 1, 4, 1, 5], 12)
    assert out.finish_reasons == ["length"]


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 4}, {"n_experts": 4, "top_k": 2}])
def test_batched_prompts_of_different_lengths_match_one_by_one(extra: dict) -> None:
    torch.manual_seed(1)
    model = _varied(Transformer(ModelConfig(**{**CFG, **extra})))
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13]]
    batched = generate(model, prompts, max_new_tokens=10)
    for prompt, seq in zip(prompts, batched.sequences, strict=False):
        assert seq == generate(model, [prompt], max_new_tokens=10).sequences[0]
        assert seq == greedy_without_cache(model, prompt, 10)


def test_stop_tokens_end_a_row_and_are_not_returned(model: Transformer) -> None:
    free = generate(model, [[1, 2, 3]], max_new_tokens=10).sequences[0]
    stop = free[4]
    first = free.index(stop)
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=10, stop_tokens=[stop])
    assert out.sequences[0] == free[:first]
    assert out.finish_reasons[0] == "stop"


def test_streaming_callback_sees_every_new_token_in_order(model: Transformer) -> None:
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = generate(
        model, [[1, 2], [3, 4, 5]], max_new_tokens=8, callback=lambda r, t: seen[r].append(t)
    )
    assert seen == {0: out.sequences[0], 1: out.sequences[1]}


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(model: Transformer) -> None:
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5)
    a = generate(model, [[1, 2, 3]], seed=5, **kw).sequences
    b = generate(model, [[1, 2, 3]], seed=5, **kw).sequences
    c = generate(model, [[1, 2, 3]], seed=6, **kw).sequences
    assert a == b
    assert a != c


def test_top_k_one_sampling_is_greedy(model: Transformer) -> None:
    sampled = generate(model, [[9, 8, 7]], max_new_tokens=10, do_sample=True, top_k=1, seed=0)
    greedy = generate(model, [[9, 8, 7]], max_new_tokens=10)
    assert sampled.sequences == greedy.sequences


def test_top_k_and_top_p_keep_exactly_the_expected_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=3, top_p=None))
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=None, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=None, top_p=0.01))
    assert kept.tolist() == [[True, False, False, False, False]]


def test_repetition_penalty_discourages_repeats(model: Transformer) -> None:
    plain = generate(model, [[1, 2, 3]], max_new_tokens=30).sequences[0]
    penalised = generate(model, [[1, 2, 3]], max_new_tokens=30, repetition_penalty=5.0)
    seq = penalised.sequences[0]
    assert len(set(seq)) > len(set(plain))


def test_logprobs_are_those_of_the_tempered_distribution(model: Transformer) -> None:
    out = generate(model, [[4, 5, 6]], max_new_tokens=5, do_sample=True, temperature=0.7, seed=3)
    ids = [4, 5, 6, *out.sequences[0]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, 2:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.sequences[0])[:, None])
    torch.testing.assert_close(
        torch.tensor(out.logprobs[0]), expected.squeeze(1), atol=1e-5, rtol=0
    )


def test_beam_size_one_equals_greedy(model: Transformer) -> None:
    greedy = generate(model, [[2, 7, 1, 8]], max_new_tokens=15)
    beam = beam_search(model, [2, 7, 1, 8], GenerationConfig(num_beams=1, max_new_tokens=15))
    assert beam.sequences[0] == greedy.sequences[0]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model: Transformer) -> None:
    prompt = [5, 6, 7]

    def logprob(seq: list[int]) -> float:
        ids = torch.tensor([prompt + seq])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1], -1)
        return float(lp.gather(1, torch.tensor(seq)[:, None]).sum())

    greedy = generate(model, [prompt], max_new_tokens=6).sequences[0]
    beams = beam_search(model, prompt, GenerationConfig(num_beams=5, max_new_tokens=6))
    assert len(beams.sequences) == 5
    assert logprob(beams.sequences[0]) >= logprob(greedy) - 1e-5
    assert beams.scores == sorted(beams.scores, reverse=True)
    assert beams.scores[0] == pytest.approx(logprob(beams.sequences[0]) / 6, abs=1e-4)


def test_beam_search_stops_early_when_enough_hypotheses_end(model: Transformer) -> None:
    greedy = generate(model, [[1, 2]], max_new_tokens=10).sequences[0]
    cfg = GenerationConfig(num_beams=2, max_new_tokens=30, stop_tokens=[greedy[0], greedy[1]])
    out = beam_search(model, [1, 2], cfg)
    assert all(reason == "stop" for reason in out.finish_reasons)


def test_generation_does_not_leave_the_model_in_eval_mode(model: Transformer) -> None:
    model.train()
    generate(model, [[1]], max_new_tokens=2)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_invalid_generation_settings_name_the_field(
    model: Transformer, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        generate(model, [[1]], **kwargs)


def test_empty_prompts_are_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [])

"""Beam search reports per-token log-probabilities, as sampling and greedy decoding do
(issue 22 #6: it returned them empty, so `swarmlm generate --beams N --logprobs` had none)."""

from __future__ import annotations

import math

import torch

from swarmlm.model import ModelConfig, Transformer
from swarmlm.model.generate import GenerationConfig, beam_search, generate


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
    )
    return Transformer(cfg).eval()


def test_each_beam_carries_logprobs_that_sum_to_its_score() -> None:
    model = tiny_model()
    cfg = GenerationConfig(max_new_tokens=10, num_beams=4, length_penalty=0.0, stop_tokens=[3])
    out = beam_search(model, [5, 6, 7], cfg)
    assert len(out.logprobs) == len(out.sequences) == 4
    for tokens, logprobs, score, reason in zip(
        out.sequences, out.logprobs, out.scores, out.finish_reasons, strict=True
    ):
        assert len(logprobs) == len(tokens) > 0
        assert all(lp <= 0 for lp in logprobs)
        if reason == "length":
            assert math.isclose(sum(logprobs), score, abs_tol=1e-4)
        else:  # the score also counts the stop token, which the sequence leaves out
            assert sum(logprobs) >= score - 1e-4
    batch = generate(model, [[5, 6, 7], [9]], cfg)
    assert [len(lp) for lp in batch.logprobs] == [len(s) for s in batch.sequences]


def test_one_beam_gives_the_greedy_tokens_and_logprobs() -> None:
    model = tiny_model()
    greedy = generate(model, [[5, 6, 7]], max_new_tokens=8)
    beam = beam_search(model, [5, 6, 7], GenerationConfig(max_new_tokens=8, num_beams=1))
    assert beam.sequences[0] == greedy.sequences[0]
    for a, b in zip(beam.logprobs[0], greedy.logprobs[0], strict=True):
        assert math.isclose(a, b, abs_tol=1e-5)

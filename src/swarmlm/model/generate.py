"""Text generation with the KV cache: greedy, sampling (temperature, top-k, top-p, repetition
penalty) and beam search, over batches of prompts of different lengths (left padding).

Every decoding path prefills the prompt once and then feeds one token per step through the
cache; nothing here recomputes the prefix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from swarmlm.config import StrictModel
from swarmlm.model.cache import KVCache
from swarmlm.model.decode import FastDecoder
from swarmlm.model.transformer import Transformer

log = logging.getLogger(__name__)

TokenCallback = Callable[[int, int], None]
"""Called as ``callback(row, token)`` for every new token of a row that is still running."""


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(default=64, ge=0)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop_tokens: list[int] = Field(default_factory=list)
    pad_token_id: int = Field(default=0, ge=0)
    seed: int | None = None
    num_beams: int = Field(default=1, ge=1)
    length_penalty: float = 1.0
    early_stopping: bool = True
    decode: Literal["fast", "compiled", "module"] = Field(
        default="fast",
        description=(
            "How sampling/greedy decoding runs each one-token step: 'fast' (fused, transposed "
            "weight snapshot, eager), 'compiled' (the same step under torch.compile: faster "
            "per token after a one-off compile of 10-30 s per shape on CPU), 'module' (the "
            "model's forward). MoE models always use 'module'. Beam search uses 'module'."
        ),
    )


@dataclass
class GenerationOutput:
    """New tokens per prompt (stop token excluded) and why each row ended ("stop"/"length").

    ``logprobs`` holds, per new token, its log-probability under the temperature-scaled model
    distribution (before top-k/top-p filtering): what PPO needs to score its own samples.
    Greedy decoding and beam search use the unscaled distribution (greedy after any repetition
    penalty). A beam's logprobs sum to its unpenalised score less the stop token's (the stop
    token is not among the tokens). For beam search, ``scores`` holds the length-penalised
    log-probability of each result.
    """

    sequences: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Stack prompts to (batch, max_len) ids and an attention mask, padding on the left."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("every prompt is empty: each needs at least one token")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty: each needs at least one token")
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (Keskar et al. 2019): divide positive, multiply negative logits of
    tokens already present. ``seen`` is a (batch, vocab) boolean mask."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (batch, vocab)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    callback: TokenCallback | None = None,
    **overrides: object,
) -> GenerationOutput:
    """Continue each prompt (a list of token ids). Keyword overrides patch ``config``."""
    cfg = (config or GenerationConfig()).model_copy(update=overrides)
    cfg = GenerationConfig.model_validate(cfg.model_dump())
    if cfg.num_beams > 1:
        results = [beam_search(model, p, cfg) for p in prompts]
        return GenerationOutput(
            sequences=[r.sequences[0] for r in results],
            finish_reasons=[r.finish_reasons[0] for r in results],
            logprobs=[r.logprobs[0] for r in results],
            scores=[r.scores[0] for r in results],
        )
    was_training = model.training
    model.eval()
    try:
        return _sample(model, prompts, cfg, callback)
    finally:
        model.train(was_training)


def _sample(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    callback: TokenCallback | None,
) -> GenerationOutput:
    device = model.embed.weight.device
    vocab = model.cfg.vocab_size
    ids, mask = left_pad(prompts, cfg.pad_token_id, device)
    batch = ids.shape[0]
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    cache = model.new_cache(batch, ids.shape[1] + cfg.max_new_tokens)
    has_padding = not bool(mask.all())
    logits = model(
        ids, attention_mask=mask if has_padding else None, cache=cache, num_logits_to_keep=1
    ).logits[:, -1]

    seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device)
    if cfg.repetition_penalty != 1.0:
        seen.scatter_(1, ids, mask.bool())
    stop_set = set(cfg.stop_tokens)
    # Which rows still run lives on the host: the per-token bookkeeping reads tokens back
    # anyway, so keeping it there saves several tiny device ops per step (at batch 1 a step
    # is short enough for those to count).
    running = [True] * batch
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    out_logprobs: list[list[float]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    step = _step_function(model, cache, cfg)

    for _ in range(cfg.max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        if cfg.do_sample:
            scaled = logits / cfg.temperature
            filtered = filter_top_k_top_p(scaled, cfg.top_k, cfg.top_p)
            probs = torch.softmax(filtered, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            scaled = logits
            token = logits.argmax(dim=-1)
        logprob = torch.log_softmax(scaled, dim=-1).gather(1, token[:, None]).squeeze(1)

        token_list, logprob_list = token.tolist(), logprob.tolist()
        for row in range(batch):
            if not running[row]:
                continue
            if token_list[row] in stop_set:
                reasons[row] = "stop"
                running[row] = False
                continue
            out_tokens[row].append(token_list[row])
            out_logprobs[row].append(logprob_list[row])
            if callback is not None:
                callback(row, token_list[row])
        if not any(running):
            break
        if not all(running):
            keep = torch.tensor(running, device=device)
            token = torch.where(keep, token, torch.full_like(token, cfg.pad_token_id))
            if cfg.repetition_penalty != 1.0:
                seen.scatter_(1, token[:, None], keep[:, None])
        elif cfg.repetition_penalty != 1.0:
            seen.scatter_(1, token[:, None], True)
        logits = step(token)
    return GenerationOutput(sequences=out_tokens, finish_reasons=reasons, logprobs=out_logprobs)


def _step_function(
    model: Transformer, cache: KVCache, cfg: GenerationConfig
) -> Callable[[Tensor], Tensor]:
    """The one-token step ``token (batch,) -> logits (batch, vocab)`` that ``cfg.decode``
    asks for, falling back to the module path where :class:`FastDecoder` does not apply."""
    if cfg.decode != "module" and FastDecoder.supports(model.cfg):
        decoder = FastDecoder(
            model, cache, compiled=cfg.decode == "compiled", max_steps=cfg.max_new_tokens
        )
        return decoder.step
    if cfg.decode != "module":
        log.debug("decode=%r: MoE configs decode through the module path", cfg.decode)

    def module_step(token: Tensor) -> Tensor:
        out: Tensor = model(token[:, None], cache=cache, num_logits_to_keep=1).logits[:, -1]
        return out

    return module_step


@dataclass(order=True)
class _Hypothesis:
    score: float
    tokens: list[int] = field(compare=False)
    reason: str = field(compare=False)
    logprobs: list[float] = field(compare=False)


def _length_normalised(logprob_sum: float, length: int, penalty: float) -> float:
    denominator: float = float(max(length, 1)) ** penalty
    return logprob_sum / denominator


@torch.inference_mode()
def beam_search(
    model: Transformer, prompt: Sequence[int], cfg: GenerationConfig
) -> GenerationOutput:
    """Beam search for one prompt; returns the ``num_beams`` best hypotheses, best first.

    Scores are summed log-probabilities divided by ``generated_length ** length_penalty``.
    With ``early_stopping`` the search ends once ``num_beams`` hypotheses have finished;
    without it, once no running beam can still beat the worst finished one.
    """
    was_training = model.training
    model.eval()
    try:
        return _beam_search(model, prompt, cfg)
    finally:
        model.train(was_training)


def _beam_search(
    model: Transformer, prompt: Sequence[int], cfg: GenerationConfig
) -> GenerationOutput:
    device = model.embed.weight.device
    nb = cfg.num_beams
    ids, _ = left_pad([prompt], cfg.pad_token_id, device)
    cache = model.new_cache(1, ids.shape[1] + cfg.max_new_tokens)
    logits = model(ids, cache=cache, num_logits_to_keep=1).logits[:, -1]
    cache.reorder(torch.zeros(nb, dtype=torch.long, device=device))
    logits = logits.expand(nb, -1)

    stop_set = set(cfg.stop_tokens)
    beam_scores = torch.full((nb,), float("-inf"), device=device)
    beam_scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(nb)]
    beam_logprobs: list[list[float]] = [[] for _ in range(nb)]
    finished: list[_Hypothesis] = []
    done = False

    for step in range(cfg.max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        candidates = (beam_scores[:, None] + logprobs).reshape(-1)
        top_scores, top_idx = torch.topk(candidates, min(2 * nb, candidates.numel()))
        vocab = logprobs.shape[-1]
        next_beams: list[list[int]] = []
        next_logprobs: list[list[float]] = []
        next_scores: list[float] = []
        next_source: list[int] = []
        next_tokens: list[int] = []
        for score, flat in zip(top_scores.tolist(), top_idx.tolist(), strict=True):
            if math.isinf(score):
                break
            src, tok = divmod(flat, vocab)
            if tok in stop_set:
                length = step + 1
                finished.append(
                    _Hypothesis(
                        _length_normalised(score, length, cfg.length_penalty),
                        beams[src],
                        "stop",
                        beam_logprobs[src],
                    )
                )
                continue
            next_beams.append([*beams[src], tok])
            next_logprobs.append([*beam_logprobs[src], float(logprobs[src, tok])])
            next_scores.append(score)
            next_source.append(src)
            next_tokens.append(tok)
            if len(next_beams) == nb:
                break
        finished.sort(reverse=True)
        del finished[nb:]
        if _beam_search_done(finished, next_scores, step + 1, cfg) or not next_beams:
            done = True
            break
        while len(next_beams) < nb:  # fewer live candidates than beams: pad with dead beams
            next_beams.append(next_beams[0])
            next_logprobs.append(next_logprobs[0])
            next_scores.append(float("-inf"))
            next_source.append(next_source[0])
            next_tokens.append(next_tokens[0])
        beams, beam_logprobs = next_beams, next_logprobs
        beam_scores = torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(next_source, dtype=torch.long, device=device))
        token = torch.tensor(next_tokens, dtype=torch.long, device=device)
        logits = model(token[:, None], cache=cache, num_logits_to_keep=1).logits[:, -1]

    for beam, lps, score in zip(beams, beam_logprobs, beam_scores.tolist(), strict=True):
        if not done and not math.isinf(score):
            finished.append(
                _Hypothesis(
                    _length_normalised(score, len(beam), cfg.length_penalty), beam, "length", lps
                )
            )
    finished.sort(reverse=True)
    best = finished[:nb]
    return GenerationOutput(
        sequences=[h.tokens for h in best],
        finish_reasons=[h.reason for h in best],
        logprobs=[h.logprobs for h in best],
        scores=[h.score for h in best],
    )


def _beam_search_done(
    finished: list[_Hypothesis], running_scores: list[float], length: int, cfg: GenerationConfig
) -> bool:
    if len(finished) < cfg.num_beams:
        return False
    if cfg.early_stopping:
        return True
    live = [s for s in running_scores if not math.isinf(s)]
    if not live:
        return True
    best_possible = _length_normalised(max(live), length, cfg.length_penalty)
    return best_possible < finished[-1].score

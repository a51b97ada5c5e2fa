"""Safety filter: pluggable checks run on prompts and responses before they reach annotators,
the reward model or PPO.

A check is any callable ``check(prompt, response) -> reason | None`` with a ``name``;
``response`` is None when a prompt alone is checked. Shipped checks: block lists (words and
phrases on word boundaries), regular-expression patterns (personal data by default), length
limits, repetition limits (repeated n-grams, runs of one character), a classifier hook (any
``text -> probability of harm`` callable) and a reward-score floor. :class:`SafetyFilter` runs
them in order, stops at the first that objects, logs the item with its reason and counts it
per check, so an operator can see what was dropped and why.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import Field

from swarmlm.config import StrictModel
from swarmlm.rlhf.errors import SafetyConfigError
from swarmlm.rlhf.preferences import PreferencePair

log = logging.getLogger(__name__)

T = TypeVar("T")

# Personal data that must not be shown to annotators or learned from.
PII_PATTERNS: dict[str, str] = {
    "email": r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b",
    "phone": r"(?<!\d)(?:\+?\d[\s-]?){9,14}\d(?!\d)",
    "credit_card": r"\b(?:\d[ -]?){13,16}\b",
}


class SafetyCheck(Protocol):
    name: str

    def __call__(self, prompt: str, response: str | None) -> str | None: ...


def _subject(prompt: str, response: str | None) -> str:
    return prompt if response is None else response


@dataclass
class BlockList:
    """Objects when the prompt or the response contains a listed word or phrase."""

    words: Sequence[str]
    name: str = "block_list"

    def __post_init__(self) -> None:
        cleaned = sorted({w.strip().lower() for w in self.words if w.strip()})
        self._re = (
            re.compile(r"\b(?:" + "|".join(re.escape(w) for w in cleaned) + r")\b", re.IGNORECASE)
            if cleaned
            else None
        )

    def __call__(self, prompt: str, response: str | None) -> str | None:
        if self._re is None:
            return None
        for where, text in (("prompt", prompt), ("response", response)):
            if text is not None and (m := self._re.search(text)):
                return f"{where} contains blocked term {m.group(0).lower()!r}"
        return None


@dataclass
class PatternCheck:
    """Objects when a named regular expression matches the prompt or the response."""

    patterns: dict[str, str]
    name: str = "pattern"

    def __post_init__(self) -> None:
        self._compiled: dict[str, re.Pattern[str]] = {}
        for label, pattern in self.patterns.items():
            try:
                self._compiled[label] = re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise SafetyConfigError(
                    f"safety pattern {label!r} is not a valid regular expression: {exc}"
                ) from exc

    def __call__(self, prompt: str, response: str | None) -> str | None:
        for where, text in (("prompt", prompt), ("response", response)):
            if text is None:
                continue
            for label, rx in self._compiled.items():
                if rx.search(text):
                    return f"{where} matches pattern {label!r}"
        return None


@dataclass
class LengthLimit:
    """Bounds on characters: prompts up to ``max_prompt_chars``; responses within
    ``[min_response_chars, max_response_chars]``."""

    max_prompt_chars: int | None = None
    min_response_chars: int = 0
    max_response_chars: int | None = None
    name: str = "length"

    def __call__(self, prompt: str, response: str | None) -> str | None:
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            return f"prompt has {len(prompt)} characters, over {self.max_prompt_chars}"
        if response is None:
            return None
        n = len(response.strip())
        if n < self.min_response_chars:
            return f"response has {n} characters, under {self.min_response_chars}"
        if self.max_response_chars is not None and n > self.max_response_chars:
            return f"response has {n} characters, over {self.max_response_chars}"
        return None


def repeated_ngram_fraction(words: Sequence[str], n: int) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = none)."""
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class RepetitionLimit:
    """Degenerate text: too many repeated word n-grams, or one character repeated too often."""

    max_repeated_ngram_fraction: float = 0.5
    ngram: int = 3
    max_char_run: int = 20
    name: str = "repetition"

    def __post_init__(self) -> None:
        self._run = re.compile(r"(.)\1{" + str(max(1, self.max_char_run - 1)) + r",}", re.DOTALL)

    def __call__(self, prompt: str, response: str | None) -> str | None:
        text = _subject(prompt, response)
        where = "prompt" if response is None else "response"
        frac = repeated_ngram_fraction(text.lower().split(), self.ngram)
        if frac > self.max_repeated_ngram_fraction:
            return (
                f"{where} repeats {frac:.0%} of its {self.ngram}-grams "
                f"(limit {self.max_repeated_ngram_fraction:.0%})"
            )
        if self._run.search(text):
            return f"{where} repeats one character more than {self.max_char_run} times"
        return None


@dataclass
class ClassifierCheck:
    """A hook for a learned classifier: ``classify(text) -> probability of harm`` in [0, 1]."""

    classify: Callable[[str], float]
    threshold: float = 0.5
    name: str = "classifier"

    def __call__(self, prompt: str, response: str | None) -> str | None:
        text = _subject(prompt, response)
        score = float(self.classify(text))
        if score >= self.threshold:
            where = "prompt" if response is None else "response"
            return f"classifier scores {where} {score:.3f} >= {self.threshold}"
        return None


@dataclass
class RewardFloor:
    """Drops responses the reward model scores below ``floor`` (prompts are not scored)."""

    score: Callable[[str, str], float]
    floor: float
    name: str = "reward_floor"

    def __call__(self, prompt: str, response: str | None) -> str | None:
        if response is None:
            return None
        value = float(self.score(prompt, response))
        if value < self.floor:
            return f"reward {value:.3f} below floor {self.floor}"
        return None


@dataclass
class Verdict:
    ok: bool
    check: str | None = None
    reason: str | None = None


@dataclass
class SafetyFilter:
    """Runs checks in order; the first objection filters the item (logged and counted)."""

    checks: list[SafetyCheck] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    seen: int = 0

    def check(self, prompt: str, response: str | None = None, *, item: str = "") -> Verdict:
        self.seen += 1
        for chk in self.checks:
            reason = chk(prompt, response)
            if reason is not None:
                self.counts[chk.name] += 1
                log.warning("safety filter dropped %s: %s: %s", item or "item", chk.name, reason)
                return Verdict(False, chk.name, reason)
        return Verdict(True)

    @property
    def filtered(self) -> int:
        return sum(self.counts.values())

    def filter_prompts(self, prompts: Iterable[str]) -> list[str]:
        return [p for i, p in enumerate(prompts) if self.check(p, item=f"prompt {i}").ok]

    def filter_pairs(self, pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
        """Keep pairs whose prompt and both responses pass."""
        kept = []
        for i, pair in enumerate(pairs):
            label = f"pair {i}"
            if (
                self.check(pair.prompt, item=f"{label} prompt").ok
                and self.check(pair.prompt, pair.chosen, item=f"{label} chosen").ok
                and self.check(pair.prompt, pair.rejected, item=f"{label} rejected").ok
            ):
                kept.append(pair)
        return kept

    def summary(self) -> dict[str, int]:
        return {"checked": self.seen, "filtered": self.filtered, **dict(self.counts)}


class SafetyConfig(StrictModel):
    """The safety filter's rule set (section ``safety`` of every rlhf config)."""

    enabled: bool = True
    default_block_list: bool = Field(default=True, description="use the shipped block list")
    block_lists: list[Path] = Field(default_factory=list, description="files, one term a line")
    block_words: list[str] = Field(default_factory=list)
    pii_patterns: bool = Field(default=True, description="block e-mail, phone and card numbers")
    patterns: dict[str, str] = Field(default_factory=dict, description="name -> regex")
    max_prompt_chars: int | None = Field(default=4000, ge=1)
    min_response_chars: int = Field(default=1, ge=0)
    max_response_chars: int | None = Field(default=4000, ge=1)
    max_repeated_ngram_fraction: float = Field(default=0.6, ge=0, le=1)
    ngram: int = Field(default=3, ge=1)
    max_char_run: int = Field(default=30, ge=2)
    classifier: str | None = Field(
        default=None, description="'module:function' taking text, returning P(harm) in [0, 1]"
    )
    classifier_threshold: float = Field(default=0.5, ge=0, le=1)
    reward_floor: float | None = Field(
        default=None, description="drop responses the reward model scores below this"
    )


def read_block_list(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SafetyConfigError(f"cannot read block list {path}: {exc}") from exc
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def default_block_list() -> list[str]:
    text = resources.files("swarmlm.rlhf").joinpath("rules/default_blocklist.txt").read_text()
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def load_classifier(spec: str) -> Callable[[str], float]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SafetyConfigError(f"safety.classifier {spec!r} must look like 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SafetyConfigError(f"safety.classifier {spec!r} cannot be loaded: {exc}") from exc
    if not callable(fn):
        raise SafetyConfigError(f"safety.classifier {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def build_safety_filter(
    cfg: SafetyConfig, reward_score: Callable[[str, str], float] | None = None
) -> SafetyFilter:
    """The filter a config describes; ``reward_score`` is needed when a reward floor is set."""
    if not cfg.enabled:
        return SafetyFilter([])
    words = list(cfg.block_words)
    if cfg.default_block_list:
        words += default_block_list()
    for path in cfg.block_lists:
        words += read_block_list(path)
    checks: list[SafetyCheck] = [BlockList(words)]
    patterns = (dict(PII_PATTERNS) if cfg.pii_patterns else {}) | cfg.patterns
    if patterns:
        checks.append(PatternCheck(patterns))
    checks.append(LengthLimit(cfg.max_prompt_chars, cfg.min_response_chars, cfg.max_response_chars))
    checks.append(RepetitionLimit(cfg.max_repeated_ngram_fraction, cfg.ngram, cfg.max_char_run))
    if cfg.classifier is not None:
        checks.append(ClassifierCheck(load_classifier(cfg.classifier), cfg.classifier_threshold))
    if cfg.reward_floor is not None:
        if reward_score is None:
            raise SafetyConfigError(
                "safety.reward_floor is set but no reward model is available to score responses"
            )
        checks.append(RewardFloor(reward_score, cfg.reward_floor))
    return SafetyFilter(checks)

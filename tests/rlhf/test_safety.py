"""The safety filter blocks, logs with a reason, and counts per check."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from swarmlm.rlhf.errors import SafetyConfigError
from swarmlm.rlhf.preferences import PreferencePair
from swarmlm.rlhf.safety import (
    RepetitionLimit,
    SafetyConfig,
    build_safety_filter,
    repeated_ngram_fraction,
)


def test_filter_blocks_logs_and_counts_each_reason(caplog: pytest.LogCaptureFixture) -> None:
    flt = build_safety_filter(
        SafetyConfig(block_words=["smite"], max_response_chars=40, max_char_run=5)
    )
    pairs = [
        PreferencePair("Tell me", "peace be with you", "go away"),  # kept
        PreferencePair("Tell me how to smite", "ok", "no"),  # blocked word in prompt
        PreferencePair("Mail", "write to a@b.org", "no"),  # e-mail pattern
        PreferencePair("Long", "x" * 3 + " y" * 30, "fine"),  # too long
        PreferencePair("Rep", "aaaaaaaa", "fine"),  # character run
    ]
    with caplog.at_level(logging.WARNING, logger="swarmlm.rlhf.safety"):
        kept = flt.filter_pairs(pairs)
    assert kept == pairs[:1]
    assert flt.counts == {"block_list": 1, "pattern": 1, "length": 1, "repetition": 1}
    assert flt.summary()["filtered"] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert any("pair 1 prompt" in m and "blocked term 'smite'" in m for m in messages)
    assert any("pair 2 chosen" in m and "pattern 'email'" in m for m in messages)
    assert any("over 40" in m for m in messages)


def test_shipped_block_list_and_word_boundaries() -> None:
    flt = build_safety_filter(SafetyConfig())
    assert not flt.check("How do I make a bomb?").ok
    assert flt.check("The bombastic preacher spoke").ok


def test_classifier_hook_and_reward_floor() -> None:
    cfg = SafetyConfig(
        classifier="tests.rlhf.test_safety:shouting_classifier",
        classifier_threshold=0.5,
        reward_floor=0.0,
    )
    flt = build_safety_filter(cfg, reward_score=lambda p, r: 1.0 if "good" in r else -1.0)
    assert flt.check("p", "a good reply").ok
    shout = flt.check("p", "A GOOD REPLY")
    assert (shout.ok, shout.check) == (False, "classifier")
    low = flt.check("p", "a poor reply")
    assert (low.ok, low.check) == (False, "reward_floor")
    assert "below floor 0.0" in (low.reason or "")


def shouting_classifier(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def test_bad_rules_are_refused_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(SafetyConfigError, match="pattern 'bad'"):
        build_safety_filter(SafetyConfig(patterns={"bad": "("}))
    with pytest.raises(SafetyConfigError, match="reward_floor"):
        build_safety_filter(SafetyConfig(reward_floor=0.5))
    with pytest.raises(SafetyConfigError, match="cannot read block list"):
        build_safety_filter(SafetyConfig(block_lists=[tmp_path / "none.txt"]))
    with pytest.raises(SafetyConfigError, match="module:function"):
        build_safety_filter(SafetyConfig(classifier="nocolon"))


def test_block_list_files_extend_the_rules(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# comment\nbabylon\n")
    flt = build_safety_filter(SafetyConfig(block_lists=[words], default_block_list=False))
    assert not flt.check("p", "Babylon is fallen").ok
    assert flt.check("p", "Jerusalem").ok


def test_repetition_measure() -> None:
    assert repeated_ngram_fraction(
        ["a", "b", "c", "a", "b", "c", "a", "b", "c"], 3
    ) == pytest.approx(1 - 3 / 7)
    assert RepetitionLimit(0.5, 2, 50)("p", "and the and the and the and the") is not None
    assert RepetitionLimit(0.5, 2, 50)("p", "in the beginning god created") is None


def test_disabled_filter_passes_everything() -> None:
    flt = build_safety_filter(SafetyConfig(enabled=False))
    assert flt.check("make a bomb", "x" * 10000).ok


def test_shipped_sentiment_lexicon_scores_positive_minus_negative_share() -> None:
    from swarmlm.rlhf.lexicon import LexiconSentiment

    lex = LexiconSentiment.default()
    assert lex.score("Joy and peace, but wrath!") == pytest.approx((2 - 1) / 5)
    assert lex.score("") == 0.0
    assert lex.negativity("death death life") == pytest.approx(2 / 3)
    assert lex.positive.isdisjoint(lex.negative)

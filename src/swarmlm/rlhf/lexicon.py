"""A lexicon sentiment score: the benchmark's known true reward, and a simple classifier.

``score(text) = (positive words - negative words) / words``, in [-1, 1]; words are lower-cased
runs of letters. The word lists ship as package data (``lexicon/positive.txt``,
``lexicon/negative.txt``), chosen from the King James vocabulary, since the benchmark's prompts
are KJV verse openings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_WORD = re.compile(r"[a-z]+")


def _read(name: str) -> frozenset[str]:
    text = resources.files("swarmlm.rlhf").joinpath(f"lexicon/{name}").read_text("utf-8")
    return frozenset(
        w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")
    )


@dataclass(frozen=True)
class LexiconSentiment:
    positive: frozenset[str]
    negative: frozenset[str]

    @classmethod
    def default(cls) -> LexiconSentiment:
        return cls(_read("positive.txt"), _read("negative.txt"))

    def score(self, text: str) -> float:
        words = _WORD.findall(text.lower())
        if not words:
            return 0.0
        pos = sum(w in self.positive for w in words)
        neg = sum(w in self.negative for w in words)
        return (pos - neg) / len(words)

    def negativity(self, text: str) -> float:
        """Share of negative words: usable as the safety filter's classifier hook."""
        words = _WORD.findall(text.lower())
        return sum(w in self.negative for w in words) / len(words) if words else 0.0

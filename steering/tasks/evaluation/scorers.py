"""Behaviour scorers for generated text, registered by name: each maps texts to one number per text.

``sentiment`` (VADER, :mod:`vaderSentiment`) and ``keywords`` ship; add one with :func:`register`. Unknown
names and unknown parameters are rejected with the valid ones listed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar, Literal

from pydantic import Field

from steering.names import Registry
from steering.params import StrictParams, parse_params


class Scorer:
    name: ClassVar[str]
    summary: ClassVar[str]
    higher: ClassVar[str]
    """What a higher score means, for reports."""

    class Params(StrictParams):
        pass

    def __init__(self, params: Scorer.Params) -> None:
        self.params = params

    def score(self, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError


SCORERS: Registry[type[Scorer]] = Registry("scorer", "scorer")
register = SCORERS.register
scorer_names = SCORERS.names


def get_scorer(name: str, params: dict | None = None) -> Scorer:
    cls = SCORERS.get(name)
    return cls(parse_params(cls.Params, params, f"scorer {name!r}"))


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@register
class Sentiment(Scorer):
    name = "sentiment"
    summary = "VADER sentiment of the text (compound score in [-1, 1], or one of its pos/neg/neu shares)"
    higher = "more positive"

    class Params(StrictParams):
        component: Literal["compound", "pos", "neg", "neu"] = Field(
            "compound", description="which VADER score: compound (-1..1) or the pos/neg/neu proportions")

    def score(self, texts: Sequence[str]) -> list[float]:
        analyzer = _vader()
        component = self.params.component  # type: ignore[attr-defined]  # this class's Params
        return [float(analyzer.polarity_scores(t)[component]) for t in texts]


@register
class Keywords(Scorer):
    name = "keywords"
    summary = "1 when the text contains any of the given words (whole words), else 0"
    higher = "mentions the words"

    class Params(StrictParams):
        words: list[str] = Field(..., min_length=1, description="words to look for")
        case_sensitive: bool = False

    def score(self, texts: Sequence[str]) -> list[float]:
        params: Keywords.Params = self.params  # type: ignore[assignment]
        flags = 0 if params.case_sensitive else re.IGNORECASE
        pat = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in params.words) + r")\b", flags)
        return [float(bool(pat.search(t))) for t in texts]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams over all word n-grams of the texts (lower-cased,
    whitespace words); 0 when there are none."""
    seen, total = set(), 0
    for t in texts:
        words = t.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0

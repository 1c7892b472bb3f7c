"""Highlight words: case-insensitive whole words, emoji codes ignored (Rocket.Chat ≥ 7.1).

"light" does not match "highlighted", and "thumbsup" does not match `:thumbsup:`.
Case is ignored letter for letter, as Rocket.Chat's `iu` regex does: "straße"
matches "STRAẞE" but not "strasse" (full case folding would). Python's IGNORECASE
agrees with JavaScript's `iu` on every case pair in Unicode but the Turkish ones:
it makes i, I, ı and İ one letter, where JavaScript keeps ı and İ apart, so those
four are matched with case-sensitive classes. The message text is normalised once
per message; each distinct highlight compiles once per process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

_EMOJI_CODE = re.compile(r":[\w+-]+:")
#: What `iu` lets each Turkish letter match, written so IGNORECASE cannot widen it.
_TURKISH_LETTERS = {"i": "(?-i:[iI])", "I": "(?-i:[iI])", "ı": "(?-i:ı)", "İ": "(?-i:İ)"}


def highlight_text(text: str) -> str:
    """The message text as highlights are matched against: emoji codes out."""
    return _EMOJI_CODE.sub(" ", text)


@lru_cache(maxsize=4096)
def _pattern(word: str) -> re.Pattern[str] | None:
    word = word.strip()
    if not word:
        return None
    literal = "".join(_TURKISH_LETTERS.get(letter) or re.escape(letter) for letter in word)
    return re.compile(rf"(?<!\w){literal}(?!\w)", re.IGNORECASE)


def is_highlighted(text: str, highlights: Iterable[str]) -> bool:
    """Whether `text` (already through `highlight_text`) contains any highlight word."""
    for word in highlights:
        pattern = _pattern(word)
        if pattern is not None and pattern.search(text):
            return True
    return False

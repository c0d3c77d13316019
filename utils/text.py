"""Transcripts and the audio rate every model here reads: text normalisation and the character
vocabulary (shared by the data layer and the generated corpus, which import nothing else of each
other)."""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Optional

from .errors import UsageError

SAMPLING_RATE = 16_000
WORD_DELIMITER, UNK, PAD = "|", "[UNK]", "[PAD]"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "\u2018": "'", "`": "'"})


def normalize_text(text: str, language: str = "", chars_to_ignore: Optional[list[str]] = None) -> str:
    """Lower-case, drop punctuation and symbols, keep letters (with diacritics), marks and digits.

    An apostrophe survives only between two letters (``don't``, ``l'home``); every other
    punctuation or symbol character becomes a word break. Turkish/Azerbaijani dotted and dotless
    I are lower-cased by their own rule.
    """
    text = unicodedata.normalize("NFC", text or "")
    for char in chars_to_ignore or ():
        text = text.replace(char, "")
    if language in ("tr", "az"):
        text = text.replace("I", "ı").replace("İ", "i")
    text = text.lower().translate(_APOSTROPHES)
    out = []
    for i, char in enumerate(text):
        if char == "'":
            between_letters = 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()
            out.append("'" if between_letters else " ")
        elif unicodedata.category(char)[0] in "LMN":
            out.append(char)
        else:
            out.append(" ")
    return " ".join("".join(out).split())


def build_vocab(texts: list[str]) -> dict[str, int]:
    """Character vocabulary of normalised training transcripts: letters sorted, then ``|`` for the
    space, ``[UNK]`` and ``[PAD]`` (the CTC blank)."""
    chars = sorted(set("".join(texts)) - {" "})
    if not chars:
        raise UsageError("the training split has no characters left after normalisation: expected transcripts")
    vocab = {char: i for i, char in enumerate(chars)}
    for token in (WORD_DELIMITER, UNK, PAD):
        vocab[token] = len(vocab)
    return vocab


def unseen_chars(texts: list[str], vocab: dict[str, int]) -> Counter:
    """Characters of ``texts`` missing from ``vocab``; the tokenizer maps them to ``[UNK]``."""
    return Counter(char for text in texts for char in text if char != " " and char not in vocab)

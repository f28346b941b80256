"""Caption text helpers that do not depend on a dataset: TBPS-CLIP's cleaning and a count of captions a
tokenizer would cut.

:func:`clean_caption_tbps` is the caption cleaning of TBPS-CLIP (``misc/caption_dataset.py::pre_caption``), which
Bi-IRRA applies to the captions of every language: lower case; each of the characters ``. ! " ( ) * # : ; ~``
becomes a space (commas and all other characters stay); runs of two or more whitespace characters become one
space; leading/trailing newlines and spaces are removed; then at most ``max_words`` space-separated words are kept.
Chinese has no spaces between words, so the word cap does not shorten a Chinese caption: it is cut at token level
when it is encoded (:func:`utils.tokenizers.encode_caption`, 77 tokens in Bi-IRRA).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from utils.errors import UserError
from utils.tokenizers import Tokenizer, caption_tokens

_TBPS_SPACED = re.compile(r"[.!\"()*#:;~]")
_TBPS_RUNS = re.compile(r"\s{2,}")

#: TBPS-CLIP and Bi-IRRA keep at most this many words of a caption (``max_words=77``).
TBPS_MAX_WORDS = 77


def clean_caption_tbps(text: str, max_words: Optional[int] = TBPS_MAX_WORDS) -> str:
    """``text`` cleaned as TBPS-CLIP does (see the module docstring); ``max_words=None`` keeps every word.

    Raises:
        UserError: ``max_words`` is below 1.
    """
    if max_words is not None and max_words < 1:
        raise UserError(f"max_words must be at least 1 (or None for no limit), got {max_words}.")
    text = _TBPS_SPACED.sub(" ", text.lower())
    text = _TBPS_RUNS.sub(" ", text).rstrip("\n").strip(" ")
    if max_words is not None:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


def count_truncated_captions(captions: Iterable[str], tokenizer: Tokenizer, text_length: int) -> int:
    """How many of ``captions`` :func:`utils.tokenizers.encode_caption` would cut at ``text_length`` tokens.

    A caption is cut when its content ids plus the start and end tokens exceed ``text_length``. Identical
    captions are encoded once (and counted as often as they occur).

    Raises:
        UserError: ``text_length`` is below 2.
    """
    if text_length < 2:
        raise UserError(f"text_length must be at least 2 (start and end tokens), got {text_length}; fix --text_length.")
    lengths: dict[str, int] = {}
    cut = 0
    for caption in captions:
        if caption not in lengths:
            lengths[caption] = len(caption_tokens(caption, tokenizer))
        cut += lengths[caption] > text_length
    return cut

"""CLIP's byte-level BPE tokenizer, with IRRA's vocabulary (49408 ids, ``<|mask|>`` = 49405).

The merges table is not shipped with this repository: it is read from the ``open_clip`` package
(``bpe_simple_vocab_16e6.txt.gz``), or from an explicit ``bpe_path``.

Vocabulary layout (ids in this order):

* 0..255: the 256 printable stand-ins for the bytes 0..255 (see :func:`bytes_to_unicode`),
* 256..511: the same 256 symbols with the end-of-word marker ``</w>`` appended,
* 512..49404: one symbol per BPE merge, in merge-rank order,
* 49405 ``<|mask|>``, 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>``.

CLIP uses 48894 merges (file lines 1..48894) and two special tokens. IRRA drops the id of the last
merge (``jeky`` + ``ll</w>`` -> ``jekyll</w>``) to make room for ``<|mask|>`` while keeping 49408 ids,
but keeps that merge in its BPE rank table, so IRRA's tokenizer raises ``KeyError`` on any text that
contains "jekyll". Here the last merge is dropped from the rank table as well: "jekyll" is encoded as
``jeky`` + ``ll</w>``. Every text IRRA can encode gets exactly IRRA's ids.

Text is normalised before splitting: ``ftfy.fix_text``, HTML entities unescaped twice, whitespace runs
collapsed to one space, stripped, lower-cased.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import ftfy
import regex

from utils.errors import UserError

logger = logging.getLogger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP reads merges from file lines [1, 49152 - 256 - 2 + 1); IRRA drops the last one of those.
_CLIP_MERGE_END = 49152 - 256 - 2 + 1
NUM_MERGES = _CLIP_MERGE_END - 1 - 1

MASK_TOKEN = "<|mask|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (MASK_TOKEN, SOT_TOKEN, EOT_TOKEN)
END_OF_WORD = "</w>"

# Special tokens, contractions, letter runs, single digits, runs of other non-space characters.
_TOKEN_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def default_bpe_path() -> Path:
    """Location of the merges file inside the installed ``open_clip`` package.

    The package is located without importing it (importing open_clip pulls in torch and timm).

    Raises:
        UserError: ``open_clip`` is not installed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"The CLIP tokenizer needs the BPE merges file '{BPE_FILE_NAME}', which is shipped by the "
            "open_clip package, but open_clip is not installed. Run `pip install open_clip_torch`, or pass "
            "SimpleTokenizer(bpe_path=...) pointing at a copy of the file."
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value 0..255 to a printable unicode character, reversibly.

    Bytes that are already visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the remaining 68 bytes are assigned chr(256), chr(257), ... in increasing byte order.
    The dict's insertion order (visible bytes first, then the rest) is the vocabulary order of ids 0..255.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    hidden = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(hidden)})
    return table


def clean_text(text: str) -> str:
    """Normalise a caption the way CLIP does before splitting it into words."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


def _read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    if not bpe_path.is_file():
        raise UserError(
            f"BPE merges file not found: '{bpe_path}'. Pass the path of CLIP's '{BPE_FILE_NAME}' "
            "(shipped by `pip install open_clip_torch`)."
        )
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(
            f"Cannot read BPE merges file '{bpe_path}' ({err}); it should be CLIP's gzip-compressed "
            f"'{BPE_FILE_NAME}'. Reinstall open_clip_torch or pass a good copy."
        ) from err
    selected = lines[1 : 1 + NUM_MERGES]
    merges = [tuple(line.split()) for line in selected]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(
            f"BPE merges file '{bpe_path}' is not CLIP's '{BPE_FILE_NAME}': expected at least "
            f"{NUM_MERGES + 1} lines of 'first second' pairs after the header."
        )
    return merges  # type: ignore[return-value]


class SimpleTokenizer:
    """Byte-level BPE tokenizer giving IRRA's token ids.

    Attributes:
        encoder: token string -> id (e.g. ``encoder["<|mask|>"] == 49405``).
        decoder: id -> token string.
        vocab_size: 49408.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None) -> None:
        path = default_bpe_path() if bpe_path is None else Path(bpe_path)
        merges = _read_merges(path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols]
        vocab += [first + second for first, second in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for i, tok in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        # word (in byte symbols) -> its BPE pieces; special tokens are single pieces of their own.
        self._cache: dict[str, tuple[str, ...]] = {tok: (tok,) for tok in SPECIAL_TOKENS}
        logger.debug("Loaded %d BPE merges from %s", len(merges), path)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Split one word (already mapped to byte symbols) into vocabulary pieces."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            ranked = [(self.bpe_ranks.get(pair), pair) for pair in zip(parts, parts[1:])]
            ranked = [(rank, pair) for rank, pair in ranked if rank is not None]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no start/end tokens added)."""
        ids: list[int] = []
        for word in _TOKEN_PATTERN.findall(clean_text(text)):
            if word not in SPECIAL_TOKENS:
                word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; each end of word becomes a space. Invalid UTF-8 is replaced."""
        pieces = []
        for i in ids:
            token = self.decoder.get(int(i))
            if token is None:
                raise UserError(f"Token id {int(i)} is outside the vocabulary (0..{self.vocab_size - 1}).")
            pieces.append(token)
        raw = bytearray(self.byte_decoder[ch] for ch in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

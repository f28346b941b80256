"""Tests for utils/simple_tokenizer.py.

Expected ids are worked out by hand from the vocabulary layout: ids 0..255 are the byte symbols
(visible bytes '!'..'~' first, so byte b in that range has id b - 33), 256..511 the same with '</w>',
and the merge on file line n (n >= 1) has id 512 + n - 1.
"""

import gzip
import importlib.util

import pytest

from utils.errors import UserError
from utils.simple_tokenizer import SimpleTokenizer, bytes_to_unicode, clean_text, default_bpe_path


@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def merge_lines():
    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as handle:
        return handle.read().split("\n")


def merge_id(lines, merge):
    """Id of the symbol produced by the merge written as 'first second' in the file."""
    return 512 + lines.index(merge) - 1


def test_byte_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    ids = {b: i for i, b in enumerate(table)}
    assert ids[ord("!")] == 0 and ids[ord("a")] == 64 and ids[ord("~")] == 93
    # Hidden bytes: 0..32 (33), 127..160 (34), 173 (1) -> chr(256)..chr(323), in byte order.
    assert table[0] == chr(256) and table[32] == chr(256 + 32) and table[173] == chr(256 + 67)
    assert table["é".encode()[0]] == "Ã"


def test_vocab_size_and_special_ids(tok):
    assert tok.vocab_size == 49408 == len(tok.decoder)
    assert tok.encoder["<|mask|>"] == 49405
    assert tok.encoder["<|startoftext|>"] == 49406
    assert tok.encoder["<|endoftext|>"] == 49407
    assert tok.encoder["a"] == 64 and tok.encoder["a</w>"] == 320


def test_known_word_ids(tok, merge_lines):
    # Single-character words are byte symbols with '</w>': 'a' -> 256 + 64, '.' -> 256 + 13, digits too.
    assert tok.encode("a") == [320]
    assert tok.encode(".") == [269]
    assert tok.encode("123") == [272, 273, 274]
    assert tok.encode("a,b") == [320, 267, 321]
    # Whole-word merges: their file line gives the id.
    assert merge_lines[7] == "th e</w>" and tok.encode("the") == [518]
    assert merge_lines[2022] == "per son</w>" and tok.encode("person") == [2533]
    assert merge_lines[2012] == "shir t</w>" and tok.encode("shirt") == [2523]
    assert tok.encode("The person's shirt.") == [518, 2533, merge_id(merge_lines, "' s</w>"), 2523, 269]


def test_contractions_and_punctuation(tok):
    enc = tok.encoder
    assert tok.encode("don't") == [enc["don</w>"], enc["'t</w>"]]
    assert tok.encode("they'll") == [enc["they</w>"], enc["'ll</w>"]]
    # A run of non-letter, non-digit symbols is one word.
    # A run of non-letter, non-digit symbols is one word: no end-of-word marker inside it.
    assert tok.encode("a?!b") == tok.encode("a ?! b")
    assert tok.encode("?!") != tok.encode("? !") == [256 + ord("?") - 33, 256 + ord("!") - 33]


def test_special_tokens_in_text(tok):
    ids = tok.encode("<|startoftext|>a <|MASK|> the<|endoftext|>")
    assert ids == [49406, 320, 49405, 518, 49407]


def test_cleaning(tok):
    assert clean_text("  A \n\t B  ") == "a b"
    assert clean_text("&amp;amp;") == "&"
    assert clean_text("cafÃ©") == "café"  # ftfy repairs mojibake
    assert tok.encode("A\n\n  MAN") == tok.encode("a man")
    assert tok.encode("&lt;") == tok.encode("<")


def test_unicode_and_round_trip(tok):
    text = "A woman in a red shirt, café naïve 😀 日本 3-piece!"
    ids = tok.encode(text)
    assert tok.decode(ids).split() == "a woman in a red shirt , café naïve 😀 日本 3 - piece !".split()
    # An unknown character falls back to its UTF-8 bytes: the emoji's 4 bytes are all in the vocabulary.
    assert tok.decode(tok.encode("😀")) == "😀 "


def test_jekyll_encodes_without_last_merge(tok, merge_lines):
    assert merge_lines[48894] == "jeky ll</w>"  # the last merge CLIP uses; IRRA gives it no id
    assert "jekyll</w>" not in tok.encoder
    assert ("jeky", "ll</w>") not in tok.bpe_ranks
    assert tok.encode("Jekyll") == [tok.encoder["jeky"], tok.encoder["ll</w>"]]
    assert tok.encoder["jeky"] == merge_id(merge_lines, "je ky")
    assert tok.decode(tok.encode("jekyll")) == "jekyll "


def test_bpe_cache(tok):
    first = tok.encode("backpack")
    assert "backpack" in tok._cache
    assert tok.encode("backpack") == first


def test_decode_bad_id(tok):
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.decode([5, 49408])


def test_missing_bpe_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        SimpleTokenizer(bpe_path=tmp_path / "nope.txt.gz")


def test_corrupt_bpe_file(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="Cannot read"):
        SimpleTokenizer(bpe_path=bad)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(UserError, match="not CLIP's"):
        SimpleTokenizer(bpe_path=short)


def test_open_clip_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install open_clip_torch"):
        default_bpe_path()

"""The on-disk cache of tokenised captions: reused when nothing changed, rebuilt when anything did."""
import os

import pytest
import torch

import datasets.bases as bases
from datasets.bases import caption_cache_path, tokenize_captions
from utils.tokenizers import ClipBpeTokenizer

CAPTIONS = ["a man in a red shirt", "a woman with a black backpack", "a man in a red shirt", "grey shorts"]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipBpeTokenizer()


def count_encodes(monkeypatch):
    calls = []
    original = bases.encode_caption
    monkeypatch.setattr(bases, "encode_caption", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_second_call_reads_the_cache(tmp_path, tokenizer, monkeypatch):
    calls = count_encodes(monkeypatch)
    first = tokenize_captions(CAPTIONS, tokenizer, 16, cache_dir=str(tmp_path))
    assert len(calls) == 3  # distinct captions encoded once
    path = caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 16)
    assert os.path.isfile(path) and not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
    second = tokenize_captions(CAPTIONS, tokenizer, 16, cache_dir=str(tmp_path))
    assert len(calls) == 3 and torch.equal(first, second) and second.dtype == torch.long
    assert torch.equal(first, tokenize_captions(CAPTIONS, tokenizer, 16))  # the same as without a cache


def test_any_change_is_another_cache_file(tmp_path, tokenizer):
    base = caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 16)
    assert caption_cache_path(str(tmp_path), CAPTIONS[:3], tokenizer, 16) != base          # another annotation file
    assert caption_cache_path(str(tmp_path), CAPTIONS[::-1], tokenizer, 16) != base        # another order
    assert caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 20) != base              # another text length
    assert caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 16, truncate=False) != base

    class OtherVocabulary(ClipBpeTokenizer):
        def fingerprint(self):
            return "another-vocabulary"

    other = OtherVocabulary(bpe=tokenizer.bpe)
    assert caption_cache_path(str(tmp_path), CAPTIONS, other, 16) != base                  # another tokenizer


@pytest.mark.parametrize("damage", [b"not a torch file", "wrong shape"])
def test_a_damaged_cache_is_rebuilt(tmp_path, tokenizer, damage, monkeypatch):
    path = caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 16)
    os.makedirs(os.path.dirname(path))
    if isinstance(damage, bytes):
        open(path, "wb").write(damage)
    else:
        torch.save(torch.zeros(2, 3, dtype=torch.int32), path)
    calls = count_encodes(monkeypatch)
    table = tokenize_captions(CAPTIONS, tokenizer, 16, cache_dir=str(tmp_path))
    assert len(calls) == 3 and table.shape == (4, 16)
    assert torch.equal(torch.load(path, weights_only=True).long(), table)  # rewritten whole

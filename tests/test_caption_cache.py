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
    original = bases.caption_tokens
    monkeypatch.setattr(bases, "caption_tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
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


@pytest.mark.parametrize("damage", [b"not a torch file", "wrong shape", "bare table", "no count", "bad count"])
def test_a_damaged_cache_is_rebuilt(tmp_path, tokenizer, damage, monkeypatch):
    path = caption_cache_path(str(tmp_path), CAPTIONS, tokenizer, 16)
    os.makedirs(os.path.dirname(path))
    good = torch.zeros(4, 16, dtype=torch.int32)
    if isinstance(damage, bytes):
        open(path, "wb").write(damage)
    else:
        saved = {"wrong shape": {"ids": torch.zeros(2, 3, dtype=torch.int32), "cut": 0},
                 "bare table": good,  # the first version's layout
                 "no count": {"ids": good},
                 "bad count": {"ids": good, "cut": 5}}[damage]
        torch.save(saved, path)
    calls = count_encodes(monkeypatch)
    table = tokenize_captions(CAPTIONS, tokenizer, 16, cache_dir=str(tmp_path))
    assert len(calls) == 3 and table.shape == (4, 16)
    data = torch.load(path, weights_only=True)
    assert torch.equal(data["ids"].long(), table) and data["cut"] == 0  # rewritten whole


def test_cut_captions_are_counted_and_reported(tmp_path, tokenizer, caplog):
    long = "a man in a red shirt with a black backpack and grey shorts walking"
    captions = [long, "grey shorts", long, "a woman"]
    lengths = [len(tokenizer.encode(c)) + 2 for c in captions]
    limit = 8  # the long caption does not fit, the others do; one exactly full caption is not cut
    assert lengths[0] > limit and max(lengths[1:2] + lengths[3:]) <= limit
    exact = " ".join(["a"] * (limit - 2))
    assert len(tokenizer.encode(exact)) + 2 == limit
    captions.append(exact)
    with caplog.at_level("INFO", logger=bases.logger.name):
        first = tokenize_captions(captions, tokenizer, limit, cache_dir=str(tmp_path), label="training captions")
    cut_lines = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cut_lines) == 1 and cut_lines[0].levelname == "WARNING"
    assert "2 of 5 training captions (40.0%) are longer than 8 tokens" in cut_lines[0].getMessage()
    assert first[4, -1] == tokenizer.specials.eos  # the exactly full caption ends properly
    caplog.clear()
    with caplog.at_level("INFO", logger=bases.logger.name):  # from the cache: the same report
        second = tokenize_captions(captions, tokenizer, limit, cache_dir=str(tmp_path), label="training captions")
    assert torch.equal(first, second)
    assert ["2 of 5 training captions" in r.getMessage() for r in caplog.records if "longer" in r.getMessage()] == [True]
    caplog.clear()
    with caplog.at_level("INFO", logger=bases.logger.name):  # nothing cut: nothing said
        tokenize_captions(captions[1:2], tokenizer, limit)
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]

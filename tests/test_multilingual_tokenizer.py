"""A SentencePiece tokenizer trained on English and Chinese captions, read as XLM-R's; TBPS-CLIP caption cleaning;
counting captions cut at the text length."""
import os
import unicodedata

import numpy as np
import pytest

from datasets.synthetic import describe, sample_identity
from datasets.synthetic_zh import describe_zh
from utils.captions import clean_caption_tbps, count_truncated_captions
from utils.errors import UserError
from utils.tokenizers import SENTENCEPIECE_FILE, encode_caption, load_hf_tokenizer, train_sentencepiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests


def _captions(n=60, seed=0):
    rng = np.random.default_rng(seed)
    english, chinese = [], []
    for i in range(n):
        who = sample_identity(rng, ["red", "blue", "green", "white"][i % 4], ["black", "grey", "pink"][i % 3])
        english.append(describe(who, rng, walking=bool(i % 2)))
        chinese.append(describe_zh(who, rng, walking=bool(i % 2)))
    return english, chinese


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    english, chinese = _captions()
    cleaned = [clean_caption_tbps(c) for c in english + chinese]  # trained on the text it will encode
    folder = train_sentencepiece(cleaned, tmp_path_factory.mktemp("spm"), vocab_size=400)
    return folder, load_hf_tokenizer("xlmr", folder, clean=clean_caption_tbps), english, chinese


def test_round_trips_english_and_chinese_without_unknown_words(trained):
    folder, tok, english, chinese = trained
    assert os.path.isfile(os.path.join(folder, SENTENCEPIECE_FILE))
    unk = tok.specials.unk
    held_out_en, held_out_zh = _captions(n=20, seed=1)  # captions the model was not trained on, same vocabulary
    for caption in english[:20] + held_out_en:
        ids = tok.encode(caption)
        assert unk not in ids
        assert tok.decode(ids) == clean_caption_tbps(caption)
    for caption in chinese[:20] + held_out_zh:
        ids = tok.encode(caption)
        assert unk not in ids and " " not in tok.decode(ids)
        # cleaned as the English ones (T恤 -> t恤); NFKC turns full-width commas into ','
        assert tok.decode(ids) == unicodedata.normalize("NFKC", clean_caption_tbps(caption))
    assert tok.encode("一名穿着红色上衣的男子")[-1] != unk  # Chinese characters are pieces, not <unk>


def test_english_words_and_chinese_characters_are_pieces(trained):
    _, tok, english, chinese = trained
    words = sum(len(clean_caption_tbps(c).split()) for c in english)
    pieces = sum(len(tok.encode(c)) for c in english)
    assert pieces < 1.15 * words  # "short-sleeved" is 3 pieces, almost every other word one
    for caption in chinese[:10]:
        text = unicodedata.normalize("NFKC", clean_caption_tbps(caption))
        tokens = tok.hf.convert_ids_to_tokens(tok.encode(caption))
        assert tokens[0] == "\u2581" + text[0] and tokens[1:] == list(text[1:])


def test_special_ids_are_xlmr_layout(trained):
    _, tok, _, _ = trained
    special = tok.specials
    assert (special.bos, special.pad, special.eos, special.unk) == (0, 1, 2, 3)
    assert special.mask == tok.vocab_size - 1 == len(tok.hf) - 1
    assert tok.hf.convert_ids_to_tokens([0, 1, 2, 3, special.mask]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.random_token_range == (4, special.mask)
    row = encode_caption("a man in a red shirt", tok, 12)
    content = tok.encode("a man in a red shirt")
    assert row.tolist() == [0, *content, 2] + [1] * (12 - len(content) - 2)
    long_row = encode_caption("这位女士留着黑色长发，背着一个白色的包。" * 10, tok, 16)  # cut at token level
    assert long_row[0] == 0 and long_row[-1] == 2 and 1 not in long_row.tolist()


def test_training_is_deterministic_and_vocabulary_is_clipped(tmp_path):
    english, chinese = _captions(n=10)
    a = train_sentencepiece(english + chinese, tmp_path / "a", vocab_size=5000)
    b = train_sentencepiece(english + chinese, tmp_path / "b", vocab_size=5000)
    read = lambda d: open(os.path.join(d, SENTENCEPIECE_FILE), "rb").read()  # noqa: E731
    assert read(a) == read(b)
    tok = load_hf_tokenizer("xlmr", a)
    assert 40 < tok.vocab_size < 5000  # as many pieces as ten captions per language support
    with pytest.raises(UserError, match="vocab_size 10 .* needs one id per distinct character plus 3"):
        train_sentencepiece(chinese, tmp_path / "small", vocab_size=10)
    assert not os.listdir(tmp_path / "small")  # no partial model is left behind
    with pytest.raises(UserError, match="no non-empty caption"):
        train_sentencepiece(["", "  "], tmp_path / "empty")


def test_offline_without_files_names_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match=f"tokenizer folder {tmp_path} has no sentencepiece.bpe.model; put the xlmr "
                                        "tokenizer files there"):
        load_hf_tokenizer("xlmr", str(tmp_path))


def test_clean_caption_tbps():
    assert clean_caption_tbps('A man (tall); wears: a "RED" shirt!  And~ #blue* pants.\n') == \
        "a man tall wears a red shirt and blue pants"
    assert clean_caption_tbps("Commas, stay, here.") == "commas, stay, here"
    assert clean_caption_tbps(" ".join(f"w{i}" for i in range(100))) == " ".join(f"w{i}" for i in range(77))
    assert clean_caption_tbps("one two three", max_words=2) == "one two"
    long_chinese = "这位女士留着黑色长发。" * 30
    assert clean_caption_tbps(long_chinese) == long_chinese  # no spaces (and "。" is not "."): nothing is cut
    assert clean_caption_tbps("x " * 100, max_words=None).count("x") == 100
    with pytest.raises(UserError, match="max_words must be at least 1"):
        clean_caption_tbps("x", max_words=0)


def test_count_truncated_captions(trained):
    _, tok, english, _ = trained
    lengths = [len(tok.encode(c)) + 2 for c in english]
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(length > limit for length in lengths)
    assert 0 < expected < len(english)
    assert count_truncated_captions(english, tok, limit) == expected
    assert count_truncated_captions(english + english[:3], tok, limit) == expected + sum(l > limit for l in lengths[:3])
    assert count_truncated_captions(english, tok, max(lengths)) == 0
    with pytest.raises(UserError, match="at least 2"):
        count_truncated_captions(english, tok, 1)

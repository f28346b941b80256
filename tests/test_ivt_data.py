"""IVT's data side: multi-level caption cutting, the attribute file, the training item, the transforms, the WordPiece
vocabulary built from captions, and the IVT flags."""
import argparse
import json
import os
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from datasets.mla import (
    MultiLevelDataset,
    MultiLevelItem,
    build_ivt_test_transform,
    build_ivt_train_set,
    build_mla_item,
    caption_levels,
    comma_fragments,
    phrase_candidates,
    read_attribute_file,
)
from datasets.pedes import build_dataset
from datasets.resumable import SampleKey, SeededSamples
from datasets.synthetic import write_synthetic
from datasets.transforms import build_ivt_transforms
from model.ivt import IVTCriterion, add_ivt_arguments, build_ivt_model, build_ivt_tokenizer, check_ivt_arguments
from utils.errors import UserError
from utils.tokenizers import build_wordpiece_vocab, encode_caption, load_hf_tokenizer

CUHK = "A woman with long black hair, wearing a white shirt and blue jeans. She carries a red bag."
LIST = "The man wears a black jacket, grey pants, and white shoes."
CAPTIONS = [CUHK, LIST, "A man, red, tall.", "Man.", "A young girl in a pink dress walks beside a grey wall."]


def test_phrase_candidates_follow_the_released_rule():
    # Per sentence: the longest comma part and the remaining parts re-joined, each when longer than 5 characters.
    assert phrase_candidates(CUHK.lower()) == [
        "wearing a white shirt and blue jeans", "a woman with long black hair", "she carries a red bag"]
    assert phrase_candidates(LIST.lower()) == ["the man wears a black jacket", "grey pants, and white shoes"]
    # "a man" (5 characters) is the first longest part and too short; the rest " red, tall" is kept.
    assert phrase_candidates("a man, red, tall.") == ["red, tall"]
    assert phrase_candidates("man.") == []


def test_comma_fragments_follow_the_released_rule():
    assert comma_fragments(CUHK.lower()) == [
        "a woman with long black hair", "wearing a white shirt and blue jeans", "she carries a red bag"]
    assert comma_fragments(LIST.lower()) == ["the man wears a black jacket", "grey pants", "and white shoes"]
    assert comma_fragments("a man, red, tall.") == []
    assert comma_fragments("[a man in a coat.]") == ["a man in a coat"]


def test_caption_levels_draw_from_the_candidates_and_fall_back_to_the_caption():
    gen = torch.Generator().manual_seed(0)
    phrases, words = set(), set()
    for _ in range(60):
        sentence, phrase, word = caption_levels(CUHK, gen)
        assert sentence == CUHK.lower()
        phrases.add(phrase)
        words.add(word)
    assert phrases == set(phrase_candidates(CUHK.lower()))
    assert words == set(comma_fragments(CUHK.lower()))
    # Very short captions: nothing longer than 5 characters, so the level is the whole caption.
    assert caption_levels("Man.", gen) == ("man.", "man.", "man.")
    assert caption_levels("A man, red, tall.", gen) == ("a man, red, tall.", "red, tall", "a man, red, tall.")
    first = [caption_levels(LIST, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert first[0] == first[1]


def write_attributes(path, entries):
    path.write_text(json.dumps({"train": entries, "test": [{"captions": "ignored", "att": {"x": "y"}}]}))
    return str(path)


def test_attribute_words_are_random_subsets(tmp_path):
    path = write_attributes(tmp_path / "att.json", [
        {"file_path": "a.jpg", "id": 1, "captions": "A woman in a red coat.", "att": {"up": "red coat", "g": "woman"}},
        {"file_path": "b.jpg", "id": 2, "captions": ["A man  walking slowly.", "A tall man, walking."],
         "att": [{"g": "man"}, {}]},
    ])
    table = read_attribute_file(path)
    assert table == {"a woman in a red coat.": ("red coat", "woman"), "a man walking slowly.": ("man",)}
    gen = torch.Generator().manual_seed(0)
    words = {caption_levels("A woman in a red coat.", gen, table)[2] for _ in range(80)}
    assert words == {"red coat", "woman", "red coat,woman", "woman,red coat"}
    assert caption_levels("A MAN walking slowly.", gen, table)[2] == "man"  # looked up case- and space-blind
    # A caption without attributes takes a phrase, as released; so does one the file does not list.
    assert caption_levels("A tall man, walking.", gen, table)[2] in phrase_candidates("a tall man, walking.")
    assert caption_levels("A girl in a blue skirt.", gen, table)[2] == "a girl in a blue skirt"
    with pytest.raises(UserError, match="no such file"):
        read_attribute_file(str(tmp_path / "absent.json"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    (json.dumps({"val": []}), "no list of entries"),
    (json.dumps([{"captions": "a"}]), "entry 0 is not an object with 'captions' and 'att'"),
    (json.dumps([{"captions": "a", "att": 5}]), "neither an object of strings nor a list of strings"),
    (json.dumps([{"captions": ["a", "b", "c"], "att": [{"x": "y"}, {"x": "z"}]}]), "3 captions but 2"),
])
def test_bad_attribute_files(tmp_path, content, message):
    (tmp_path / "att.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_attribute_file(str(tmp_path / "att.json"))


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    return build_wordpiece_vocab(CAPTIONS * 3, str(tmp_path_factory.mktemp("wordpiece")), vocab_size=120)


def test_wordpiece_vocabulary_from_captions(vocab_folder):
    lines = open(os.path.join(vocab_folder, "vocab.txt"), encoding="utf-8").read().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(lines) == len(set(lines)) <= 120
    tok = load_hf_tokenizer("wordpiece", vocab_folder)
    special = tok.specials
    assert (special.pad, special.unk, special.bos, special.eos, special.mask) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(lines) and tok.random_token_range == (5, len(lines))
    # Real words (seen or only made of seen letters) are never the unknown token — the transformers 5 pitfall.
    for text in CAPTIONS + ["SHIRTLESS women wearing jeans"]:
        ids = tok.encode(text)
        assert ids and special.unk not in ids, text
    assert tok.decode(tok.encode(LIST)).replace(" ,", ",").replace(" .", ".") == LIST.lower()
    row = encode_caption("A man.", tok, 8)
    assert row[0] == special.bos and special.eos in row.tolist() and row[-1] == special.pad


def test_wordpiece_vocabulary_is_a_function_of_the_captions(tmp_path, vocab_folder):
    # Rebuilt for evaluation, the vocabulary must be the training one: same words, same ids, whatever the order.
    again = build_wordpiece_vocab(list(reversed(CAPTIONS * 3)), str(tmp_path / "again"), vocab_size=120)
    first = open(os.path.join(vocab_folder, "vocab.txt"), encoding="utf-8").read()
    assert open(os.path.join(again, "vocab.txt"), encoding="utf-8").read() == first
    lines = first.splitlines()
    # For these ASCII captions BERT's word split is: runs of letters, and every other visible character alone.
    words = re.findall(r"[a-z]+|[^\sa-z]", " ".join(CAPTIONS).lower())
    chars = sorted(set("".join(words)))
    assert lines[5:5 + len(chars)] == chars and lines[5 + len(chars):5 + 2 * len(chars)] == ["##" + c for c in chars]
    counts = Counter(w for w in words if len(w) > 1)
    assert lines[5 + 2 * len(chars):] == sorted(counts, key=lambda w: (-counts[w], w))  # most frequent first
    tok = load_hf_tokenizer("wordpiece", vocab_folder)
    assert len(tok.encode("woman")) == 1 and len(tok.encode("shirtless")) > 1


def test_wordpiece_vocabulary_bad_input(tmp_path):
    with pytest.raises(UserError, match="needs at least"):
        build_wordpiece_vocab(CAPTIONS, str(tmp_path), vocab_size=20)
    with pytest.raises(UserError, match="no caption text"):
        build_wordpiece_vocab(["", "  "], str(tmp_path), vocab_size=50)


def ivt_args(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    add_ivt_arguments(parser.add_argument_group("ivt"))
    parser.add_argument("--tokenizer_dir", default="")  # a shared option of the data group
    args = parser.parse_args(list(argv))
    args.img_size, args.stride_size, args.text_length, args.cache_dir = [32, 16], 8, 16, str(tmp_path / "cache")
    args.dataset_name, args.root_dir, args.bias_lr_factor = "CUHK-PEDES", str(tmp_path / "data"), 2.0
    return args


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ivt_data")
    write_synthetic(root / "data", "CUHK-PEDES", num_ids=12, images_per_id=2, image_size=(40, 20), seed=0)
    return root


def test_build_ivt_tokenizer_caches_the_caption_vocabulary(tmp_path, vocab_folder):
    args = ivt_args(tmp_path, "--wordpiece_vocab_size", "100")
    tok = build_ivt_tokenizer(args, CAPTIONS)
    cache = tmp_path / "cache" / "tokenizers"
    (folder,) = os.listdir(cache)
    vocab = cache / folder / "vocab.txt"
    stamp = os.stat(vocab).st_mtime_ns
    again = build_ivt_tokenizer(args, list(reversed(CAPTIONS)))  # same set of captions: same vocabulary, reused
    assert again.fingerprint() == tok.fingerprint() and os.stat(vocab).st_mtime_ns == stamp
    build_ivt_tokenizer(args, CAPTIONS[:2])
    assert len(os.listdir(cache)) == 2
    given = build_ivt_tokenizer(ivt_args(tmp_path, "--tokenizer_dir", vocab_folder), [])
    assert given.files == (os.path.join(vocab_folder, "vocab.txt"),)
    with pytest.raises(UserError, match="needs BERT's uncased vocabulary"):
        build_ivt_tokenizer(ivt_args(tmp_path, "--ivt_checkpoint", "x.pth"), CAPTIONS)
    with pytest.raises(UserError, match="no training captions"):
        build_ivt_tokenizer(args, [])


def test_evaluation_finds_the_vocabulary_of_the_training_captions(synthetic_root):
    # test.py builds the tokenizer without captions: they are read from the dataset, giving the same vocabulary.
    args = ivt_args(synthetic_root, "--wordpiece_vocab_size", "200")
    captions = [sample[3] for sample in build_dataset("CUHK-PEDES", args.root_dir, verbose=False).train]
    trained = build_ivt_tokenizer(args, captions)
    assert build_ivt_tokenizer(args, None).fingerprint() == trained.fingerprint()


def test_training_set_batches_feed_the_model(synthetic_root):
    args = ivt_args(synthetic_root, "--ivt_width", "32", "--ivt_depth", "1", "--ivt_heads", "2",
                    "--wordpiece_vocab_size", "200")
    dataset = build_dataset("CUHK-PEDES", args.root_dir, verbose=False)
    samples = dataset.train
    tokenizer = build_ivt_tokenizer(args, [sample[3] for sample in samples])
    train_set = build_ivt_train_set(args, dataset, tokenizer, seed=3)
    assert isinstance(train_set, MultiLevelDataset) and len(train_set) == len(samples)
    # Items are drawn from the stream the training loader seeds per sample: the same key, the same item.
    seeded = SeededSamples(train_set, seed=3)
    assert torch.equal(seeded[SampleKey(1, 5)]["caption_ids"], seeded[SampleKey(1, 5)]["caption_ids"])
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4)))
    assert batch["images"].shape == (4, 3, 3, 32, 16) and batch["caption_ids"].shape == (4, 3, 16)
    model = build_ivt_model(args, 0, None, tokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size and model.config.pad_id == tokenizer.specials.pad == 0
    assert build_ivt_model(args).config.vocab_size == 200  # without the tokenizer: the most ids it can have
    losses = IVTCriterion()(model(batch), batch)
    losses["cmpm_loss"].backward()
    assert torch.isfinite(losses["cmpm_loss"]) and model.encoder_vl.cls_token.grad is not None
    image = build_ivt_test_transform(args)(Image.open(samples[0][2]))
    assert image.shape == (3, 32, 16)


def test_ivt_transforms():
    image = Image.fromarray((torch.rand(50, 30, 3) * 255).byte().numpy())
    test = build_ivt_transforms((32, 16), is_train=False)(image)
    assert test.shape == (3, 32, 16) and -1.0 <= float(test.min()) and float(test.max()) <= 1.0
    train = build_ivt_transforms((32, 16), is_train=True)
    torch.manual_seed(0)
    views = [train(image) for _ in range(4)]
    assert all(v.shape == (3, 32, 16) for v in views)
    assert not torch.equal(views[0], views[1])
    with pytest.raises(UserError, match="--img_size"):
        build_ivt_transforms((32,))


def test_multi_level_item(tmp_path, vocab_folder):
    tok = load_hf_tokenizer("wordpiece", vocab_folder)
    make_item = MultiLevelItem(build_ivt_transforms((32, 16)), tok, text_length=20)
    image = Image.fromarray((torch.rand(40, 20, 3) * 255).byte().numpy())
    torch.manual_seed(0)
    item = make_item(image, CUHK, 4, 9, torch.Generator().manual_seed(1))
    assert item["pids"] == 4 and item["image_ids"] == 9
    assert item["images"].shape == (3, 3, 32, 16) and not torch.equal(item["images"][0], item["images"][1])
    ids = item["caption_ids"]
    assert ids.shape == (3, 20) and bool((ids[:, 0] == tok.specials.bos).all())
    sentence, phrase, words = caption_levels(CUHK, torch.Generator().manual_seed(1))
    for row, text in zip(ids, (sentence, phrase, words)):
        assert torch.equal(row, encode_caption(text, tok, 20))
    built = build_mla_item(ivt_args(tmp_path), tok)
    assert built.attributes is None and built.text_length == 16


def test_check_ivt_arguments(tmp_path):
    check_ivt_arguments(ivt_args(tmp_path), ["cmpm"])
    for argv, message in [(["--bmm_ratio", "1"], "--bmm_ratio"), (["--drop_path", "1.0"], "--drop_path"),
                          (["--ivt_width", "30", "--ivt_heads", "4"], "multiple of --ivt_heads"),
                          (["--wordpiece_vocab_size", "3"], "--wordpiece_vocab_size"),
                          (["--vit_weights", str(tmp_path / "vit.pth")], "vit_base_patch16_224.orig_in21k_ft_in1k"),
                          (["--bert_weights", str(tmp_path / "bert")], "bert-base-uncased"),
                          (["--attribute_file", str(tmp_path / "a.json")], "--attribute_file")]:
        with pytest.raises(UserError, match=message):
            check_ivt_arguments(ivt_args(tmp_path, *argv))
    args = ivt_args(tmp_path)
    args.text_length = 600
    with pytest.raises(UserError, match="512 positions"):
        check_ivt_arguments(args)

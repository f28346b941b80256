"""Tokenisation and IRRA's MLM masking."""
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import (ImageTextDataset, MaskingConfig, TextDataset, build_transforms, mask_tokens, tokenize,
                      tokenize_captions)
from datasets.resumable import EpochSampler, SampleKey, SeededSamples
from utils.errors import UserError
from utils.simple_tokenizer import SimpleTokenizer

MASK, SOT, EOT = 49405, 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer()


# --- tokenize ---------------------------------------------------------------------------------


def test_tokenize_pads_with_zeros(tokenizer):
    ids = tokenizer.encode("a man in a red shirt")
    out = tokenize("a man in a red shirt", tokenizer, text_length=16)
    assert out.dtype == torch.long and out.shape == (16,)
    assert out.tolist() == [SOT, *ids, EOT] + [0] * (16 - len(ids) - 2)


def test_tokenize_truncates_with_eot_last(tokenizer):
    caption = " ".join(["red"] * 30)
    red = tokenizer.encode("red")
    assert len(red) == 1
    out = tokenize(caption, tokenizer, text_length=8)
    assert out.tolist() == [SOT] + red * 6 + [EOT]
    exact = tokenize(" ".join(["red"] * 6), tokenizer, text_length=8)  # fits exactly: untouched
    assert exact.tolist() == out.tolist()


def test_tokenize_too_long_without_truncation(tokenizer):
    with pytest.raises(UserError, match="10 tokens long .* text_length is 8"):
        tokenize(" ".join(["red"] * 8), tokenizer, text_length=8, truncate=False)
    with pytest.raises(UserError, match="text_length must be at least 2"):
        tokenize("red", tokenizer, text_length=1)


def test_tokenize_captions_matches_tokenize(tokenizer):
    captions = ["a red coat", "blue shorts", "a red coat", ""]
    table = tokenize_captions(captions, tokenizer, text_length=10)
    assert table.shape == (4, 10)
    for row, caption in zip(table, captions):
        assert row.tolist() == tokenize(caption, tokenizer, 10).tolist()


# --- mask_tokens ------------------------------------------------------------------------------


def _reference_mask(tokens, config, generator):
    """Token-by-token reference drawing the same random numbers in the same order as mask_tokens."""
    n = tokens.shape[0]
    u, v = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    rand_ids = torch.randint(1, config.mask_token_id, (n,), generator=generator)
    out, labels = tokens.tolist(), [0] * n
    for i, tok in enumerate(tokens.tolist()):
        if 0 < tok < config.mask_token_id and u[i] < config.mlm_probability:
            labels[i] = tok
            if v[i] < config.masked_token_rate:
                out[i] = config.mask_token_id
            elif v[i] < config.masked_token_rate + config.masked_token_unchanged_rate:
                pass
            else:
                out[i] = int(rand_ids[i])
    if all(label == 0 for label in labels):
        labels[1], out[1] = out[1], config.mask_token_id
    return out, labels


@pytest.mark.parametrize("config", [MaskingConfig(), MaskingConfig(0.5, 0.3, 0.5), MaskingConfig(0.0, 1.0, 0.0)])
def test_mask_tokens_matches_reference(config):
    tokens = torch.tensor([SOT, 320, 1929, 49404, 1, MASK, 2, 533, EOT, 0, 0], dtype=torch.long)
    for seed in range(30):
        got_ids, got_labels = mask_tokens(tokens, config, torch.Generator().manual_seed(seed))
        want_ids, want_labels = _reference_mask(tokens, config, torch.Generator().manual_seed(seed))
        assert got_ids.tolist() == want_ids and got_labels.tolist() == want_labels
    assert tokens[1] == 320  # input untouched


def _rates(config, n=200_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, MASK, (n,), generator=torch.Generator().manual_seed(99))
    ids, labels = mask_tokens(tokens, config, gen)
    selected = labels != 0
    assert torch.equal(labels[selected], tokens[selected])
    masked = selected & (ids == MASK)
    unchanged = selected & (ids == tokens)
    replaced = selected & (ids != MASK) & (ids != tokens)
    assert ((ids[replaced] >= 1) & (ids[replaced] <= 49404)).all()
    assert torch.equal(ids[~selected], tokens[~selected])
    k = int(selected.sum())
    return k / n, int(masked.sum()) / k, int(unchanged.sum()) / k, int(replaced.sum()) / k


def test_mask_rates_default():
    sel, mask, keep, rand = _rates(MaskingConfig())
    assert sel == pytest.approx(0.15, abs=0.005)
    assert mask == pytest.approx(0.8, abs=0.012)
    assert keep == pytest.approx(0.1, abs=0.01)
    assert rand == pytest.approx(0.1, abs=0.01)


def test_mask_rates_custom_are_honoured():
    sel, mask, keep, rand = _rates(MaskingConfig(mlm_probability=0.4, masked_token_rate=0.25, masked_token_unchanged_rate=0.6))
    assert sel == pytest.approx(0.4, abs=0.005)
    assert mask == pytest.approx(0.25, abs=0.01)
    assert keep == pytest.approx(0.6, abs=0.01)
    assert rand == pytest.approx(0.15, abs=0.01)


def test_special_tokens_never_selected_and_fallback():
    tokens = torch.tensor([SOT, 0, MASK, EOT, 0], dtype=torch.long)
    ids, labels = mask_tokens(tokens, MaskingConfig(mlm_probability=1.0), torch.Generator().manual_seed(0))
    # nothing eligible -> IRRA's fallback masks position 1 and labels it with its old id
    assert ids.tolist() == [SOT, MASK, MASK, EOT, 0] and labels.tolist() == [0, 0, 0, 0, 0]
    tokens = torch.tensor([SOT, 320, 321, EOT, 0])
    ids, labels = mask_tokens(tokens, MaskingConfig(mlm_probability=0.0), torch.Generator().manual_seed(0))
    assert ids.tolist() == [SOT, MASK, 321, EOT, 0] and labels.tolist() == [0, 320, 0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"mlm_probability": 1.5}, "--mlm_probability must be in"),
     ({"masked_token_rate": -0.1}, "--masked_token_rate must be in"),
     ({"masked_token_rate": 0.7, "masked_token_unchanged_rate": 0.4}, "exceeds 1")],
)
def test_masking_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        MaskingConfig(**kwargs)


# --- datasets ---------------------------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 16), (10, 20, 30)).save(path)
    caption = "a woman in a long blue coat with black trousers and a red handbag walking on the street"
    return [(i % 3, i, str(path), caption) for i in range(12)]


def test_caption_and_mlm_relation(pairs, tokenizer):
    clean = tokenize(pairs[0][3], tokenizer, 32)
    # the same (seed, epoch, index) gives the same draws, so the two views of one item can be compared
    faithful = SeededSamples(ImageTextDataset(pairs, text_length=32, tokenizer=tokenizer, masking=MaskingConfig()), 3)
    separate = SeededSamples(ImageTextDataset(pairs, text_length=32, tokenizer=tokenizer, masking=MaskingConfig(),
                                              keep_caption_unmasked=True), 3)
    for i in range(len(pairs)):
        a, b = faithful[SampleKey(1, i)], separate[SampleKey(1, i)]
        assert a["pids"] == i % 3 and a["image_ids"] == i
        assert torch.equal(a["caption_ids"], a["mlm_ids"])  # IRRA: caption masked in place
        assert torch.equal(b["caption_ids"], clean)
        assert torch.equal(a["mlm_ids"], b["mlm_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
        chosen = b["mlm_labels"] != 0
        assert chosen.any() and torch.equal(b["mlm_labels"][chosen], clean[chosen])
        assert torch.equal(b["mlm_ids"][~chosen], clean[~chosen])
    plain = ImageTextDataset(pairs, text_length=32, tokenizer=tokenizer)[0]
    assert set(plain) == {"pids", "image_ids", "images", "caption_ids"} and torch.equal(plain["caption_ids"], clean)


def test_text_dataset_items(tokenizer):
    texts = TextDataset([4, 5], ["blue coat", "red shorts"], text_length=12, tokenizer=tokenizer)
    pid, ids = texts[1]
    assert pid == 5 and ids.tolist() == tokenize("red shorts", tokenizer, 12).tolist()


def _masks(dataset, workers, seed, epoch=1):
    """The mlm_ids of every item of ``dataset`` in index order, read as the training loader reads them."""
    sampler = EpochSampler(range(len(dataset)), batch_size=4)
    sampler.set_epoch(epoch)
    loader = DataLoader(SeededSamples(dataset, seed), batch_size=4, sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(123 + workers))
    return torch.cat([batch["mlm_ids"] for batch in loader])


def test_masking_depends_on_seed_epoch_and_index_only(pairs, tokenizer):
    dataset = ImageTextDataset(pairs, transform=build_transforms((16, 8), is_train=False), text_length=32,
                               tokenizer=tokenizer, masking=MaskingConfig(mlm_probability=0.5))
    torch.manual_seed(0)
    dataset[0]  # draws from the global stream: must not change what the loader reads
    first = _masks(dataset, 0, seed=5)
    assert torch.equal(first, _masks(dataset, 2, seed=5))  # the same whoever reads it, and however many workers
    assert not torch.equal(first, _masks(dataset, 0, seed=6))
    assert not torch.equal(first, _masks(dataset, 0, seed=5, epoch=2))
    # identical captions at different indices are masked differently
    assert not torch.equal(first[0:4], first[4:8])
    # reading an item does not move the global stream of the process that reads it
    torch.manual_seed(1)
    before = torch.rand(3)
    torch.manual_seed(1)
    SeededSamples(dataset, 5)[SampleKey(1, 0)]
    assert torch.equal(torch.rand(3), before)


def test_epoch_sampler_starts_at_an_iteration():
    from datasets import ShardedRandomSampler

    sampler = EpochSampler(ShardedRandomSampler(10, batch_size=4, seed=2), batch_size=4)
    sampler.set_epoch(3)
    whole = list(sampler)
    assert len(whole) == len(sampler) == 10 and {key.epoch for key in whole} == {3}
    assert sorted(key.index for key in whole) == list(range(10))
    sampler.set_epoch(3, start_iteration=2)  # after 2 batches of 4: the last 2 indices of the same order
    assert list(sampler) == whole[8:] and len(sampler) == 2
    sampler.set_epoch(4)
    assert [key.index for key in sampler] != [key.index for key in whole]

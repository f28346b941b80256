"""Bi-IRRA's training items: captions in two languages with the tokenizer's ids, MLM rates per language, blockwise
image masks, and items that depend only on (seed, epoch, index)."""
import pytest
import torch

from datasets.bases import MaskingConfig
from datasets.bilingual import BilingualImageTextDataset, batch_keys, keyed
from datasets.multilingual import build_multilingual_dataset
from datasets.resumable import SampleKey, SeededSamples
from datasets.synthetic import write_synthetic
from datasets.transforms import build_tbps_transforms
from utils.captions import clean_caption_tbps
from utils.tokenizers import load_hf_tokenizer, train_sentencepiece

LANGUAGES = ("en", "ch")


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    root = tmp_path_factory.mktemp("bilingual")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=16, seed=5, images_per_id=2, image_size=(64, 32),
                    num_test_ids=4, num_val_ids=2, languages=list(LANGUAGES))
    dataset = build_multilingual_dataset("CUHK-PEDES", str(root), LANGUAGES, verbose=False)
    captions = [clean_caption_tbps(c) for *_, by_lang in dataset.train for c in by_lang.values()]
    tokenizer = load_hf_tokenizer("xlmr", train_sentencepiece(captions, str(root / "spm"), 2000),
                                  clean=clean_caption_tbps)
    return dataset, tokenizer


def make(dataset, tokenizer, probability=0.4, max_masks=None, ratio=0.5):
    masking = MaskingConfig.for_tokenizer(tokenizer, probability, 0.8, 0.1, max_masks=max_masks)
    return BilingualImageTextDataset(dataset.train, LANGUAGES, build_tbps_transforms((64, 32)), tokenizer, 40,
                                     masking, (4, 2), ratio)


def test_items_hold_both_languages(bilingual):
    dataset, tokenizer = bilingual
    items = make(dataset, tokenizer)
    item = items[3]
    assert set(item) == set(batch_keys(LANGUAGES)) | {"image_ids"}
    assert item["images"].shape == (3, 64, 32) and item["image_mask"].shape == (8,)
    assert int(item["image_mask"].sum()) == 4  # half of the 4 x 2 patches
    special = tokenizer.specials
    for lang in LANGUAGES:
        ids = item[keyed("caption_ids", lang)]
        assert ids[0] == special.bos and special.eos in ids.tolist() and ids.shape == (40,)
        assert torch.equal(item[keyed("attention_mask", lang)], (ids != special.pad).long())
        labels = item[keyed("mlm_labels", lang)]
        masked = labels != special.pad
        assert torch.equal(labels[masked], ids[masked])  # labels: the original ids where masked
        assert not torch.isin(ids[masked], torch.tensor(sorted(tokenizer.special_ids))).any()
    # The two captions say the same thing in two languages: decoding gives the source texts back (cleaned).
    _, _, _, captions = dataset.train[3]
    english = tokenizer.decode(item[keyed("caption_ids", "en")].tolist())
    assert english == clean_caption_tbps(captions["en"])


@pytest.mark.parametrize("language", LANGUAGES)
def test_masking_rates_per_language(bilingual, language):
    dataset, tokenizer = bilingual
    items = make(dataset, tokenizer, probability=0.4)
    selected = eligible = 0
    special = torch.tensor(sorted(tokenizer.special_ids))
    for epoch in range(6):
        seeded = SeededSamples(items, seed=epoch)
        for index in range(len(items)):
            item = seeded[SampleKey(0, index)]
            ids, labels = item[keyed("caption_ids", language)], item[keyed("mlm_labels", language)]
            eligible += int((~torch.isin(ids, special)).sum())
            selected += int((labels != tokenizer.specials.pad).sum())
    assert eligible > 3000
    assert abs(selected / eligible - 0.4) < 0.03


def test_the_cap_on_masked_tokens(bilingual):
    dataset, tokenizer = bilingual
    items = make(dataset, tokenizer, probability=0.9, max_masks=5)
    for index in range(len(items)):
        for lang in LANGUAGES:
            assert int((items[index][keyed("mlm_labels", lang)] != tokenizer.specials.pad).sum()) <= 5


def test_an_item_depends_only_on_seed_epoch_and_index(bilingual):
    dataset, tokenizer = bilingual
    items = SeededSamples(make(dataset, tokenizer), seed=3)
    first, again = items[SampleKey(2, 5)], items[SampleKey(2, 5)]
    other_epoch = items[SampleKey(3, 5)]
    for key in first:
        assert torch.equal(torch.as_tensor(first[key]), torch.as_tensor(again[key])), key
    assert any(not torch.equal(torch.as_tensor(first[k]), torch.as_tensor(other_epoch[k]))
               for k in ("image_mask", keyed("mlm_ids", "en"), keyed("mlm_ids", "ch"), "images"))

"""Multilingual annotation layout, UFine6926 and the bilingual synthetic benchmark."""
import json
import os
import re

import pytest

from datasets import build_dataset
from datasets.multilingual import (
    available_languages,
    build_multilingual_dataset,
    language_split,
    parse_languages,
)
from datasets.synthetic import main as synthetic_main
from datasets.synthetic import write_synthetic
from utils.errors import UserError

SMALL = dict(num_ids=12, images_per_id=2, image_size=(48, 16), num_test_ids=3, num_val_ids=2)


def _entries(ids_and_captions, prefix="x"):
    """Entries ``{"file_path", "id", "captions"}``, one per ``(id, [captions])``, image names numbered."""
    return [{"file_path": f"p{i:03d}.jpg", "id": pid, "captions": [f"{prefix} {c}" for c in caps]}
            for i, (pid, caps) in enumerate(ids_and_captions)]


def _write_layout(root, files, name="DS"):
    """Write ``files`` ({file name: entries}) under ``root/name/annos`` and create ``root/name/imgs``."""
    anno_dir = root / name / "annos"
    anno_dir.mkdir(parents=True, exist_ok=True)
    (root / name / "imgs").mkdir(exist_ok=True)
    for file_name, entries in files.items():
        (anno_dir / file_name).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return anno_dir


TRAIN = [(1, ["a", "b"]), (1, ["c", "d"]), (2, ["e", "f"]), (3, ["g", "h"])]
TEST = [(7, ["i", "j"]), (8, ["k", "l"])]


def _parallel_files(**overrides):
    files = {
        "train_reid_en.json": _entries(TRAIN, "en"),
        "train_reid_ch.json": _entries(TRAIN, "ch"),
        "test_reid_en.json": _entries(TEST, "en"),
        "test_reid_ch.json": _entries(TEST, "ch"),
    }
    files.update(overrides)
    return files


def test_parallel_files_load_with_matching_counts(tmp_path):
    _write_layout(tmp_path, _parallel_files())
    ds = build_multilingual_dataset("DS", tmp_path, ["en", "ch"], verbose=False)
    assert ds.languages == ("en", "ch") and ds.num_classes == 3 and ds.val is None
    img = os.path.join(tmp_path, "DS", "imgs")
    assert ds.train[:3] == [
        (0, 0, os.path.join(img, "p000.jpg"), {"en": "en a", "ch": "ch a"}),
        (0, 0, os.path.join(img, "p000.jpg"), {"en": "en b", "ch": "ch b"}),
        (0, 1, os.path.join(img, "p001.jpg"), {"en": "en c", "ch": "ch c"}),
    ]
    assert [s[0] for s in ds.train] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert ds.test["image_pids"] == [7, 8] and ds.test["caption_pids"] == [7, 7, 8, 8]
    assert ds.test["captions_by_lang"] == {"en": ["en i", "en j", "en k", "en l"],
                                           "ch": ["ch i", "ch j", "ch k", "ch l"]}
    assert ds.split("test", "ch") == {"image_pids": [7, 8], "img_paths": ds.test["img_paths"],
                                      "caption_pids": [7, 7, 8, 8], "captions": ["ch i", "ch j", "ch k", "ch l"]}
    assert ds.train_in("ch")[1] == (0, 0, os.path.join(img, "p000.jpg"), "ch b")
    table = ds.statistics_table()
    assert re.search(r"train\s*\|\s*3\s*\|\s*4\s*\|\s*8", table)
    assert re.search(r"test\s*\|\s*2\s*\|\s*2\s*\|\s*4", table)
    one = build_multilingual_dataset("DS", tmp_path, ["ch"], verbose=False)  # a plain single-language run
    assert one.train_in("ch") == ds.train_in("ch") and one.split("test", "ch") == ds.split("test", "ch")
    assert available_languages(str(tmp_path / "DS" / "annos")) == ("ch", "en")


def test_hold_out_is_the_same_in_every_language(tmp_path):
    _write_layout(tmp_path, _parallel_files())
    ds = build_multilingual_dataset("DS", tmp_path, ["en", "ch"], held_out_ids=[2], verbose=False)
    assert ds.num_classes == 2 and [s[0] for s in ds.train] == [0, 0, 0, 0, 1, 1]  # ids 1, 3 renumbered 0, 1
    assert ds.train[-1][3] == {"en": "en h", "ch": "ch h"}
    assert ds.val["image_pids"] == [2] and ds.val_id_container == {2}
    assert ds.split("val", "en")["captions"] == ["en e", "en f"]
    assert ds.split("val", "ch")["captions"] == ["ch e", "ch f"]
    with pytest.raises(UserError, match=r"Held-out identities \[9\] are not training ids"):
        build_multilingual_dataset("DS", tmp_path, ["en"], held_out_ids=[9], verbose=False)


def _mismatch(entries, index, **changes):
    out = [dict(e) for e in entries]
    out[index] = {**out[index], **changes}
    return out


@pytest.mark.parametrize("override, message", [
    ({"train_reid_ch.json": _entries(TRAIN[:3], "ch")},
     r"'.*train_reid_en\.json' and '.*train_reid_ch\.json' are not parallel: the first has 4 entries and the "
     r"second 3, so entry 3 exists in only one of them"),
    ({"train_reid_ch.json": _mismatch(_entries(TRAIN, "ch"), 2, file_path="other.jpg")},
     r"train_reid_ch\.json' are not parallel: entry 2 has file_path 'p002\.jpg' in the first and 'other\.jpg'"),
    ({"test_reid_ch.json": _mismatch(_entries(TEST, "ch"), 1, id=9)},
     r"test_reid_ch\.json' are not parallel: entry 1 has id 8 in the first and 9 in the second"),
    ({"train_reid_ch.json": _mismatch(_entries(TRAIN, "ch"), 1, captions=["only one"])},
     r"not parallel: entry 1 has 2 captions in the first and 1 in the second"),
])
def test_each_kind_of_mismatch_gives_its_message(tmp_path, override, message):
    _write_layout(tmp_path, _parallel_files(**override))
    with pytest.raises(UserError, match=message):
        build_multilingual_dataset("DS", tmp_path, ["en", "ch"], verbose=False)


def test_the_first_differing_index_is_reported_before_a_length_difference(tmp_path):
    shorter = _mismatch(_entries(TRAIN[:3], "ch"), 1, id=5)
    _write_layout(tmp_path, _parallel_files(**{"train_reid_ch.json": shorter}))
    with pytest.raises(UserError, match="entry 1 has id 1 in the first and 5 in the second"):
        build_multilingual_dataset("DS", tmp_path, ["en", "ch"], verbose=False)


def test_missing_language_file_and_other_bad_input(tmp_path):
    files = _parallel_files()
    del files["test_reid_ch.json"]
    _write_layout(tmp_path, files)
    with pytest.raises(UserError, match=r"Missing annotation file\(s\) '.*test_reid_ch\.json' \(languages with files "
                                        r"there: ch, en\).*Chinese is 'ch'"):
        build_multilingual_dataset("DS", tmp_path, ["en", "ch"], verbose=False)
    with pytest.raises(UserError, match=r"Missing annotation file\(s\) '.*train_reid_zh\.json', "
                                        r"'.*test_reid_zh\.json'"):
        build_multilingual_dataset("DS", tmp_path, ["zh"], verbose=False)
    with pytest.raises(UserError, match="must contain a 'Other' folder"):
        build_multilingual_dataset("Other", tmp_path, ["en"], verbose=False)
    with pytest.raises(UserError, match="Image folder .*pictures' not found"):
        build_multilingual_dataset("DS", tmp_path, ["en"], image_folder="pictures", verbose=False)
    ds = build_multilingual_dataset("DS", tmp_path, ["en"], verbose=False)
    with pytest.raises(UserError, match="no validation split and no training identities were held out"):
        ds.split("val")
    with pytest.raises(UserError, match="No 'ch' captions were loaded; loaded languages: en"):
        ds.train_in("ch")
    with pytest.raises(UserError, match="No 'fr' captions"):
        language_split(ds.test, "fr")


def test_malformed_entries_and_training_id_gaps(tmp_path):
    no_id = [{k: v for k, v in e.items() if k != "id"} for e in _entries(TEST, "en")]
    _write_layout(tmp_path, _parallel_files(**{"test_reid_en.json": no_id}))
    with pytest.raises(UserError, match=r"test_reid_en\.json', entry 0 has no 'id' key; every multilingual "
                                        r"annotation entry needs 'file_path', 'id' and 'captions'"):
        build_multilingual_dataset("DS", tmp_path, ["en"], verbose=False)
    gap = [(1, ["a"]), (3, ["b"])]
    _write_layout(tmp_path, _parallel_files(**{"train_reid_en.json": _entries(gap, "en"),
                                                "test_reid_en.json": _entries(TEST, "en")}))
    with pytest.raises(UserError, match=r"training ids must run from 1 to 2 without gaps .* but id 2 is missing"):
        build_multilingual_dataset("DS", tmp_path, ["en"], verbose=False)
    with pytest.raises(UserError, match="id 1 is below 2"):
        build_multilingual_dataset("DS", tmp_path, ["ch"], train_id_offset=2, verbose=False)


def test_parse_languages():
    assert parse_languages("en,ch") == ("en", "ch") and parse_languages(" ch , en ") == ("ch", "en")
    for bad in ("", "en,", "en,,ch", "e n"):
        with pytest.raises(UserError, match="comma-separated language codes"):
            parse_languages(bad)
    with pytest.raises(UserError, match="names en more than once"):
        parse_languages("en,ch,en")


def _ufine_entry(split, pid, k, words=81):
    caption = " ".join(["word"] * (words - 2) + ["long", "description."])
    return {"split": split, "id": pid, "file_path": f"images/{pid * 10 + k}.jpg", "captions": [caption, caption + " b"]}


def test_ufine6926_style_file_parses(tmp_path):
    folder = tmp_path / "UFine6926"
    (folder / "images").mkdir(parents=True)
    entries = [_ufine_entry("train", 1, 0), _ufine_entry("train", 1, 1), _ufine_entry("train", 2, 0),
               _ufine_entry("val", 3, 0), _ufine_entry("test", 4, 0), _ufine_entry("test", 5, 0)]
    (folder / "UFine6926_Annotations.json").write_text(json.dumps(entries))
    ds = build_dataset("UFine6926", tmp_path, verbose=False)
    assert ds.num_classes == 2 and [s[0] for s in ds.train] == [0, 0, 0, 0, 1, 1]
    assert ds.train[0][2] == os.path.join(tmp_path, "UFine6926", "images/10.jpg")
    assert len(ds.train[0][3].split()) == 81
    assert ds.val["image_pids"] == [3] and ds.test["caption_pids"] == [4, 4, 5, 5]
    renamed = folder / "release.json"
    os.rename(folder / "UFine6926_Annotations.json", renamed)
    with pytest.raises(UserError, match="looked for 'UFine6926_Annotations.json'"):
        build_dataset("UFine6926", tmp_path, verbose=False)
    assert build_dataset("UFine6926", tmp_path, verbose=False, anno_file="release.json").num_classes == 2
    assert build_dataset("UFine6926", tmp_path, verbose=False, anno_file=str(renamed)).test == ds.test
    with pytest.raises(UserError, match="Annotation file 'nope.json' not found .*fix --anno_file"):
        build_dataset("UFine6926", tmp_path, verbose=False, anno_file="nope.json")
    entries[2]["id"] = 5  # training ids 1 and 5: a gap
    renamed.write_text(json.dumps(entries))
    with pytest.raises(UserError, match="but id 2 is missing"):
        build_dataset("UFine6926", tmp_path, verbose=False, anno_file="release.json")


def _files(folder):
    return {os.path.relpath(os.path.join(base, n), folder): open(os.path.join(base, n), "rb").read()
            for base, _, names in os.walk(folder) for n in names}


def test_bilingual_synthetic_set_is_deterministic_and_read_back(tmp_path):
    args = dict(SMALL, seed=5, languages=("en", "ch"))
    write_synthetic(tmp_path / "a", "RSTPReid", **args)
    write_synthetic(tmp_path / "b", "RSTPReid", **args)
    write_synthetic(tmp_path / "c", "RSTPReid", **{**args, "seed": 6})
    write_synthetic(tmp_path / "plain", "RSTPReid", **{**args, "languages": None})
    a, b, c, plain = (_files(tmp_path / x) for x in ("a", "b", "c", "plain"))
    assert a == b
    assert a["RSTPReid/annos/train_reid_ch.json"] != c["RSTPReid/annos/train_reid_ch.json"]
    # the benchmark layout is the same bytes with or without the multilingual files
    assert {k: v for k, v in a.items() if not k.startswith("RSTPReid/annos/") and "SYNTHETIC" not in k} == \
        {k: v for k, v in plain.items() if "SYNTHETIC" not in k}

    ds = build_multilingual_dataset("RSTPReid", tmp_path / "a", ["en", "ch"], verbose=False)
    base = build_dataset("RSTPReid", tmp_path / "a", verbose=False)
    assert ds.num_classes == base.num_classes == 7 and ds.val is None
    assert ds.train_in("en") == base.train  # the English file holds the benchmark's captions
    assert ds.split("test", "en") == base.test
    chinese = ds.test["captions_by_lang"]["ch"]
    assert len(chinese) == len(base.test["captions"]) == 12
    assert all(re.search("[\u4e00-\u9fff]", c) and not re.search("[A-Za-z]{3,}", c) for c in chinese)
    assert len(set(ds.test["captions_by_lang"]["ch"])) == len(chinese)  # varied, not one template


@pytest.mark.parametrize("colour, word", [("red", "红"), ("blue", "蓝"), ("grey", "灰")])
def test_chinese_captions_name_only_colours_the_person_has(colour, word):
    import numpy as np

    from datasets.synthetic import sample_identity
    from datasets.synthetic_zh import COLOURS_ZH, HAIR_COLOURS_ZH, describe_zh

    words = {}  # colour word -> what it may name (黑色 and 棕色 are hair and garment words)
    for kind, table in (("garment", COLOURS_ZH), ("hair", HAIR_COLOURS_ZH)):
        for name, ws in table.items():
            for w in ws:
                words.setdefault(w, set()).add((kind, name))
    colour_word = re.compile("|".join(sorted(words, key=len, reverse=True)))  # longest first: 粉红色 before 红色
    rng = np.random.default_rng(3)
    named = 0
    for _ in range(100):
        who = sample_identity(rng, colour, "black")
        caption = describe_zh(who, rng, walking=False)
        named += word in caption
        allowed = {("garment", c) for c in (who.upper_colour, who.lower_colour, who.shoe_colour, who.bag_colour,
                                            who.hat_colour)} | {("hair", who.hair_colour)}
        assert all(words[w] & allowed for w in colour_word.findall(caption)), (caption, who)
    assert named >= 95


def test_synthetic_cli_languages(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--dataset_name", "ICFG-PEDES", "--num_ids", "6", "--images_per_id", "1",
            "--image_size", "48", "16", "--languages", "en,ch"]
    assert synthetic_main(argv) == 0
    assert sorted(os.listdir(tmp_path / "ICFG-PEDES" / "annos")) == [
        "test_reid_ch.json", "test_reid_en.json", "train_reid_ch.json", "train_reid_en.json"]
    assert synthetic_main([*argv[:-1], "en,fr"]) == 2
    assert "writes captions in en, ch only" in capsys.readouterr().err
    assert synthetic_main([*argv[:-1], "en,,ch"]) == 2
    with pytest.raises(UserError, match="No synthetic layout for UFine6926"):
        write_synthetic(tmp_path, "UFine6926", num_ids=6)

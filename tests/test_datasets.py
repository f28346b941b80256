"""Parsers of the three benchmarks on small annotation files written by the tests."""
import json
import logging
import os

import pytest
from PIL import Image

from datasets import ImageDataset, build_dataset, read_image
from datasets.pedes import DATASETS
from utils.errors import UserError


def _entry(spec_name, pid, path, captions, split):
    key = DATASETS[spec_name].path_key
    return {"id": pid, key: path, "captions": captions, "split": split}


def _write(root, name, entries, file_name=None, raw=None):
    folder = root / name
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    path = folder / (file_name or DATASETS[name].annotation_files[0])
    path.write_text(raw if raw is not None else json.dumps(entries), encoding="utf-8")
    return path


CUHK_ENTRIES = [
    _entry("CUHK-PEDES", 1, "a/1.jpg", ["one a", "one b"], "train"),
    _entry("CUHK-PEDES", 2, "a/2.jpg", ["two a", "two b"], "train"),
    _entry("CUHK-PEDES", 7, "v/7.jpg", ["val seven"], "val"),
    _entry("CUHK-PEDES", 1, "a/1b.jpg", ["one c"], "train"),
    _entry("CUHK-PEDES", 9, "t/9.jpg", ["nine a", "nine b"], "test"),
    _entry("CUHK-PEDES", 8, "t/8.jpg", ["eight"], "test"),
]


def test_cuhk_offsets_order_and_paths(tmp_path):
    _write(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    ds = build_dataset("CUHK-PEDES", tmp_path, verbose=False)
    img = os.path.join(str(tmp_path), "CUHK-PEDES", "imgs")
    assert ds.train == [
        (0, 0, os.path.join(img, "a/1.jpg"), "one a"),
        (0, 0, os.path.join(img, "a/1.jpg"), "one b"),
        (1, 1, os.path.join(img, "a/2.jpg"), "two a"),
        (1, 1, os.path.join(img, "a/2.jpg"), "two b"),
        (0, 2, os.path.join(img, "a/1b.jpg"), "one c"),
    ]
    assert ds.num_classes == 2 and ds.train_id_container == {0, 1}
    assert ds.test == {
        "image_pids": [9, 8],
        "img_paths": [os.path.join(img, "t/9.jpg"), os.path.join(img, "t/8.jpg")],
        "caption_pids": [9, 9, 8],
        "captions": ["nine a", "nine b", "eight"],
    }
    assert ds.val["image_pids"] == [7] and ds.val["captions"] == ["val seven"]
    assert ds.split("val") is ds.val and ds.split("test") is ds.test


def test_statistics_table_is_logged(tmp_path, caplog):
    _write(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    with caplog.at_level(logging.INFO, logger="datasets.pedes"):
        build_dataset("CUHK-PEDES", tmp_path)
    text = caplog.text
    assert "subset" in text and "captions" in text
    # train: 2 ids, 3 images, 5 captions; test: 2 ids, 2 images, 3 captions; val: 1 id, 1 image, 1 caption
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in text.splitlines() if line.startswith("|") and "subset" not in line}
    assert rows == {"train": ["2", "3", "5"], "val": ["1", "1", "1"], "test": ["2", "2", "3"]}


@pytest.mark.parametrize("file_name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_both_file_names_no_val(tmp_path, file_name):
    entries = [
        _entry("ICFG-PEDES", 0, "train/0/a.jpg", ["zero"], "train"),
        _entry("ICFG-PEDES", 1, "train/1/b.jpg", ["one"], "train"),
        _entry("ICFG-PEDES", 5, "test/5/c.jpg", ["five"], "test"),
    ]
    _write(tmp_path, "ICFG-PEDES", entries, file_name=file_name)
    ds = build_dataset("ICFG-PEDES", tmp_path, verbose=False)
    assert [s[0] for s in ds.train] == [0, 1]  # ids kept: offset 0
    assert ds.val is None
    assert ds.test["caption_pids"] == [5]
    with pytest.raises(UserError, match="ICFG-PEDES defines no validation split.*--val_dataset test"):
        ds.split("val")


def test_rstpreid_uses_img_path_key(tmp_path):
    entries = [
        _entry("RSTPReid", 0, "0000_c1_0001.jpg", ["a", "b"], "train"),
        _entry("RSTPReid", 3, "0003_c2_0001.jpg", ["c", "d"], "val"),
        _entry("RSTPReid", 4, "0004_c2_0001.jpg", ["e", "f"], "test"),
    ]
    assert "img_path" in entries[0]
    _write(tmp_path, "RSTPReid", entries)
    ds = build_dataset("RSTPReid", tmp_path, verbose=False)
    assert ds.train[0][0] == 0 and ds.train[1][2].endswith(os.path.join("imgs", "0000_c1_0001.jpg"))
    assert ds.val["caption_pids"] == [3, 3] and ds.test["image_pids"] == [4]


def test_missing_val_entries_in_a_dataset_that_has_val(tmp_path):
    _write(tmp_path, "RSTPReid", [_entry("RSTPReid", 0, "x.jpg", ["a"], "train"), _entry("RSTPReid", 1, "y.jpg", ["b"], "test")])
    ds = build_dataset("RSTPReid", tmp_path, verbose=False)
    with pytest.raises(UserError, match="no entries with split 'val'"):
        ds.split("val")
    with pytest.raises(UserError, match="Unknown evaluation split 'train'"):
        ds.split("train")


def test_non_contiguous_training_ids(tmp_path):
    entries = [_entry("CUHK-PEDES", i, f"{i}.jpg", ["c"], "train") for i in (1, 2, 3, 5, 6)]
    path = _write(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(UserError) as err:
        build_dataset("CUHK-PEDES", tmp_path, verbose=False)
    assert str(path) in str(err.value) and "id 4 is missing" in str(err.value)


def test_training_id_below_offset(tmp_path):
    entries = [_entry("CUHK-PEDES", i, f"{i}.jpg", ["c"], "train") for i in (0, 1, 2)]
    _write(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(UserError, match="id 0 is below 1"):
        build_dataset("CUHK-PEDES", tmp_path, verbose=False)


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, "RSTPReid", None, raw='[\n {"id": 0,\n  "split": "train"\n  "captions": []}\n]')
    with pytest.raises(UserError) as err:
        build_dataset("RSTPReid", tmp_path, verbose=False)
    assert str(path) in str(err.value) and "line 4" in str(err.value)


def test_not_a_list(tmp_path):
    _write(tmp_path, "RSTPReid", {"id": 0})
    with pytest.raises(UserError, match="must hold a JSON list"):
        build_dataset("RSTPReid", tmp_path, verbose=False)


@pytest.mark.parametrize("key", ["id", "split", "captions", "file_path"])
def test_missing_key_names_entry_and_key(tmp_path, key):
    entries = [_entry("CUHK-PEDES", 1, "a.jpg", ["x"], "train"), _entry("CUHK-PEDES", 2, "b.jpg", ["y"], "train")]
    del entries[1][key]
    _write(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(UserError, match=f"entry 1 has no '{key}' key"):
        build_dataset("CUHK-PEDES", tmp_path, verbose=False)


@pytest.mark.parametrize(
    "field, value, message",
    [("split", "dev", "split is 'dev'"), ("captions", "just a string", "must be a list of strings"),
     ("id", "abc", "'id' must be an integer"), ("file_path", 3, "must be a string path")],
)
def test_bad_field_values(tmp_path, field, value, message):
    entries = [_entry("CUHK-PEDES", 1, "a.jpg", ["x"], "train")]
    entries[0][field] = value
    _write(tmp_path, "CUHK-PEDES", entries)
    with pytest.raises(UserError, match=message):
        build_dataset("CUHK-PEDES", tmp_path, verbose=False)


def test_missing_root_folder_annotation_and_unknown_name(tmp_path):
    with pytest.raises(UserError, match="does not exist; fix --root_dir"):
        build_dataset("CUHK-PEDES", tmp_path / "nowhere")
    with pytest.raises(UserError, match="must contain a 'CUHK-PEDES' folder"):
        build_dataset("CUHK-PEDES", tmp_path)
    (tmp_path / "ICFG-PEDES").mkdir()
    with pytest.raises(UserError, match="Image folder .*imgs' not found"):
        build_dataset("ICFG-PEDES", tmp_path)
    (tmp_path / "ICFG-PEDES" / "imgs").mkdir()
    with pytest.raises(UserError, match="'ICFG-PEDES.json' or 'ICFG_PEDES.json'"):
        build_dataset("ICFG-PEDES", tmp_path)
    with pytest.raises(UserError, match="Known datasets: CUHK-PEDES, ICFG-PEDES, RSTPReid"):
        build_dataset("Market1501", tmp_path)


def test_read_image_missing_and_corrupt(tmp_path):
    good = tmp_path / "good.png"
    Image.new("L", (4, 6), 200).save(good)
    img = read_image(good)
    assert img.mode == "RGB" and img.size == (4, 6) and img.getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(UserError, match="Image file not found: .*nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="Cannot read image .*bad.jpg"):
        read_image(bad)


def test_missing_image_is_reported_when_read(tmp_path):
    _write(tmp_path, "CUHK-PEDES", CUHK_ENTRIES)
    ds = build_dataset("CUHK-PEDES", tmp_path, verbose=False)  # parsing does not open images
    images = ImageDataset(ds.test["image_pids"], ds.test["img_paths"])
    with pytest.raises(UserError, match=r"Image file not found: .*t/9\.jpg"):
        images[0]

"""The synthetic benchmark: layouts, determinism, faithful captions and drawings."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from datasets import build_dataset, tokenize_captions
from datasets.synthetic import (
    COLOURS,
    HAIR_COLOURS,
    MARKER_FILE,
    Pose,
    _colour_pairs,
    _Figure,
    describe,
    main,
    render_contact_sheet,
    sample_identity,
    write_synthetic,
)
from utils.errors import UserError

SMALL = dict(num_ids=12, images_per_id=2, image_size=(48, 16), num_test_ids=3, num_val_ids=2)


def _files(folder):
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = handle.read()
    return out


@pytest.mark.parametrize(
    "name, captions_per_image, has_val, first_train_id, path_key",
    [("CUHK-PEDES", 2, True, 1, "file_path"), ("ICFG-PEDES", 1, False, 0, "file_path"),
     ("RSTPReid", 2, True, 0, "img_path")],
)
def test_layout_is_read_back_by_the_parser(tmp_path, name, captions_per_image, has_val, first_train_id, path_key):
    summary = write_synthetic(tmp_path, name, seed=1, **SMALL)
    with open(summary.annotation_file, encoding="utf-8") as handle:
        raw = json.load(handle)
    assert all(path_key in e and {"id", "captions", "split"} <= set(e) for e in raw)
    assert min(e["id"] for e in raw if e["split"] == "train") == first_train_id
    assert {e["split"] for e in raw} == ({"train", "val", "test"} if has_val else {"train", "test"})
    assert all(len(e["captions"]) == captions_per_image for e in raw)

    ds = build_dataset(name, tmp_path, verbose=False)
    n_val = 2 if has_val else 0
    assert ds.num_classes == 12 - 3 - n_val
    assert len(ds.train) == ds.num_classes * 2 * captions_per_image
    assert len(ds.test["image_pids"]) == 3 * 2 and len(ds.test["captions"]) == 3 * 2 * captions_per_image
    assert (ds.val is not None) == has_val
    train_file_ids = {pid + first_train_id for pid in ds.train_id_container}
    eval_ids = ds.test_id_container | ds.val_id_container
    assert not train_file_ids & eval_ids and not ds.test_id_container & ds.val_id_container
    with Image.open(ds.test["img_paths"][0]) as img:
        assert img.format == "JPEG" and img.size == (16, 48)
    assert summary.num_images == {"train": ds.num_classes * 2, "val": n_val * 2, "test": 6}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    write_synthetic(tmp_path / "a", "CUHK-PEDES", seed=3, **SMALL)
    write_synthetic(tmp_path / "b", "CUHK-PEDES", seed=3, **SMALL)
    write_synthetic(tmp_path / "c", "CUHK-PEDES", seed=4, **SMALL)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["CUHK-PEDES/reid_raw.json"] != c["CUHK-PEDES/reid_raw.json"]
    assert sum(a[k] != c[k] for k in a) > len(a) // 2


def test_rewrites_its_own_output_but_refuses_other_data(tmp_path):
    write_synthetic(tmp_path, "RSTPReid", seed=0, **SMALL)
    write_synthetic(tmp_path, "RSTPReid", seed=0, **{**SMALL, "images_per_id": 1})  # replaced, no leftovers
    assert len(os.listdir(tmp_path / "RSTPReid" / "imgs")) == 12
    assert (tmp_path / "RSTPReid" / MARKER_FILE).is_file()
    (tmp_path / "CUHK-PEDES").mkdir()
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text("[]")
    with pytest.raises(UserError, match="refusing to overwrite"):
        write_synthetic(tmp_path, "CUHK-PEDES", **SMALL)
    with pytest.raises(UserError, match="cannot hold 6 test"):
        write_synthetic(tmp_path / "x", "CUHK-PEDES", num_ids=10, num_test_ids=6, num_val_ids=4)


def test_cli_and_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    argv = ["--root", str(tmp_path), "--dataset_name", "ICFG-PEDES", "--num_ids", "8", "--images_per_id", "3",
            "--image_size", "48", "16", "--contact_sheet", str(sheet)]
    assert main(argv) == 0
    with Image.open(sheet) as img:  # 8 - 8 // 6 = 7 training identities x 3 images of 16x48, 2 px gaps
        assert img.size == (3 * 18, 7 * 50)
    assert (tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json").is_file()
    assert "row 6" in (tmp_path / "sheet.png.txt").read_text()
    test_sheet = render_contact_sheet(tmp_path, "ICFG-PEDES", tmp_path / "test.png", split="test")
    with Image.open(test_sheet) as img:  # the single test identity, 3 images
        assert img.size == (3 * 18, 50)
    assert len((tmp_path / "test.png.txt").read_text().splitlines()) == 1 + 3  # header + 1 caption per image
    assert main(["--root", str(tmp_path / "y"), "--num_ids", "6", "--num_test_ids", "6"]) == 2
    assert "cannot hold" in capsys.readouterr().err


def test_colour_pairs_unique_within_an_evaluation_split():
    rng = np.random.default_rng(0)
    pairs = _colour_pairs(rng, 100, unique=True)
    assert len(set(pairs)) == 100
    many = Counter(_colour_pairs(rng, 150, unique=True))
    assert len(many) == len(COLOURS) ** 2 and max(many.values()) == 2


_COLOUR_WORD = re.compile(r"\b(red|orange|yellow|green|blue|purple|violet|pink|brown|black|white|grey|gray|blonde)\b")


def _canonical(word):
    return {"gray": "grey", "violet": "purple"}.get(word, word)


def test_captions_only_name_colours_the_person_has():
    rng = np.random.default_rng(11)
    names = list(COLOURS)
    upper_named = lower_named = total = 0
    for _ in range(300):
        who = sample_identity(rng, names[int(rng.integers(11))], names[int(rng.integers(11))])
        allowed = {who.upper_colour, who.lower_colour, who.shoe_colour, who.hair_colour, who.bag_colour, who.hat_colour}
        for _ in range(3):
            caption = describe(who, rng, walking=bool(rng.random() < 0.5))
            used = {_canonical(w) for w in _COLOUR_WORD.findall(caption.lower())}
            assert used <= allowed, (caption, who)
            total += 1
            upper_named += who.upper_colour in used
            lower_named += (who.lower_colour in used) or who.lower_type is None
            assert not re.search(r"\ba [aeiou]", caption.lower()), caption
    assert upper_named / total > 0.95 and lower_named / total > 0.95


def test_drawing_puts_garment_colours_where_they_belong():
    rng = np.random.default_rng(2)
    pose = Pose(scale=0.9, x_shift=0.0, y_slack=0.5, stride=0.02, swing=(0.0, 0.0), bag_side=1)
    checked = 0
    for _ in range(40):
        who = sample_identity(rng, "red", "blue")
        if who.bag != "none" or who.hair_length == "long" or who.upper_type == "dress":
            continue  # straps, bags and long hair may cover the probe points
        canvas = Image.new("RGB", (200, 600), (0, 0, 0))
        fig = _Figure(ImageDraw.Draw(canvas), who, pose, 600, 200)
        fig.render()
        assert canvas.getpixel(tuple(int(v) for v in fig.p(0.05, 0.3))) == COLOURS["red"]  # chest
        thigh = fig.p(fig.hip * 0.5, 0.56)
        expected = COLOURS["red"] if who.upper_type == "coat" else COLOURS["blue"]
        if who.lower_type != "skirt":
            assert canvas.getpixel(tuple(int(v) for v in thigh)) == expected
        if who.hair_length == "short":
            assert canvas.getpixel(tuple(int(v) for v in fig.p(0.0, 0.02))) in (
                HAIR_COLOURS[who.hair_colour], COLOURS.get(who.hat_colour))
        checked += 1
    assert checked >= 10


def test_captions_fit_the_text_length(tmp_path):
    summary = write_synthetic(tmp_path, "RSTPReid", seed=0, **SMALL)
    with open(summary.annotation_file, encoding="utf-8") as handle:
        captions = [c for e in json.load(handle) for c in e["captions"]]
    ids = tokenize_captions(captions, text_length=77)
    assert int((ids > 0).sum(dim=1).max()) < 77


def test_reuse_keeps_an_identical_benchmark_and_rewrites_a_different_one(tmp_path):
    from datasets.synthetic import write_synthetic

    first = write_synthetic(tmp_path, "RSTPReid", num_ids=12, seed=0, images_per_id=1)
    annotation = first.annotation_file
    stamp = os.path.getmtime(annotation)
    again = write_synthetic(tmp_path, "RSTPReid", num_ids=12, seed=0, images_per_id=1, reuse=True)
    assert os.path.getmtime(annotation) == stamp
    assert again.num_images == first.num_images and again.num_ids == first.num_ids
    with open(annotation) as handle:
        before = json.load(handle)
    changed = write_synthetic(tmp_path, "RSTPReid", num_ids=12, seed=1, images_per_id=1, reuse=True)
    assert changed.num_images == first.num_images
    with open(annotation) as handle:
        assert json.load(handle) != before  # another seed: written again, not reused
    with open(os.path.join(os.path.dirname(annotation), "SYNTHETIC.json")) as handle:
        assert json.load(handle)["seed"] == 1

"""search.py on a tiny run trained on synthetic data: ordering, gallery cache, pictures, bad input."""

import glob
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import search
import train as train_entry
from datasets import build_dataset, build_transforms, read_image, tokenize
from model import IRRA
from processor.gallery import cache_path, load_gallery, load_split
from processor.run_loading import load_run_model, open_run
from utils.simple_tokenizer import SimpleTokenizer
from processor.visualization import quote, ranking_size

QUERIES = ("a woman in a red coat with a black backpack", "A man wears a blue jacket and grey shorts.")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch tiny CLIP run on 18 synthetic identities (12 test images, 24 captions); returns (config file,
    data root). Trained once per test session: test_visualize.py reuses the folder. Tests that change a run
    work on a copy (:func:`copy_run`)."""
    from datasets.synthetic import write_synthetic

    root = tmp_path_factory.getbasetemp() / "tiny_run"
    data = root / "data"
    if not (root / "ready").exists():
        write_synthetic(data, "CUHK-PEDES", num_ids=18, images_per_id=2, num_test_ids=6, num_val_ids=2,
                        image_size=(64, 32))
        torch.manual_seed(0)
        argv = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "48",
                "--num_epoch", "1", "--warmup_epochs", "0", "--batch_size", "16", "--test_batch_size", "5",
                "--loss_names", "sdm", "--num_workers", "0", "--device", "cpu", "--precision", "fp32",
                "--root_dir", str(data), "--output_dir", str(root / "logs"), "--name", "tiny"]
        assert train_entry.main(argv) == 0
        (root / "ready").touch()
    (run_dir,) = glob.glob(str(root / "logs" / "CUHK-PEDES" / "*_tiny"))
    return os.path.join(run_dir, "configs.yaml"), str(data)


def copy_run(config_file, target):
    """A copy of the run folder (config and best.pth only), so a test may change it."""
    os.makedirs(target)
    for name in ("configs.yaml", "best.pth"):
        shutil.copy2(os.path.join(os.path.dirname(config_file), name), target)
    return os.path.join(target, "configs.yaml")


def direct_scores(config_file, data, captions, split="test"):
    """Cosine similarities [Q, G] computed straight from the model's encoders, image by image."""
    handle = open_run(config_file, root_dir=data, device="cpu")
    model = load_run_model(handle)
    gallery = getattr(build_dataset("CUHK-PEDES", data, verbose=False), split)
    transform = build_transforms(handle.args.img_size, is_train=False)
    tokenizer = SimpleTokenizer()
    with torch.no_grad():
        images = torch.stack([transform(read_image(p)) for p in gallery["img_paths"]])
        image_feats = F.normalize(model.encode_image(images), dim=1)
        text = torch.stack([tokenize(c, tokenizer, handle.args.text_length) for c in captions])
        text_feats = F.normalize(model.encode_text(text), dim=1)
    return text_feats @ image_feats.t(), gallery


def open_gallery(config_file, data, split="test", rebuild=False):
    """The gallery of ``split`` as search.py and visualize.py obtain it (cache or encoder)."""
    handle = open_run(config_file, root_dir=data, device="cpu", num_workers=0)
    return load_gallery(load_run_model(handle), handle, split, load_split(handle.args, split), rebuild=rebuild)


def search_argv(config_file, data, *extra):
    return ["--config_file", config_file, "--root_dir", data, "--device", "cpu", "--num_workers", "0", *extra]


@pytest.fixture
def count_image_encodings(monkeypatch):
    """Counts the images that pass through IRRA.encode_image."""
    seen = {"images": 0}
    original = IRRA.encode_image

    def counting(self, images):
        seen["images"] += images.shape[0]
        return original(self, images)

    monkeypatch.setattr(IRRA, "encode_image", counting)
    return seen


def test_search_ranks_as_the_model_scores(tiny_run, tmp_path):
    config, data = tiny_run
    cli = search.parse_args(search_argv(config, data, "--query", QUERIES[0], "--query", QUERIES[1], "--topk", "7",
                                        "--out", str(tmp_path / "r.png")))
    results = search.run(cli)
    scores, gallery = direct_scores(config, data, QUERIES)
    for row, hits in zip(scores, results):
        expected = torch.sort(row, descending=True, stable=True).indices[:7].tolist()
        assert [h.index for h in hits] == expected
        assert [h.rank for h in hits] == list(range(1, 8))
        assert [h.score for h in hits] == pytest.approx(row[expected].tolist(), abs=1e-5)
        assert [h.path for h in hits] == [gallery["img_paths"][i] for i in expected]
        assert [h.pid for h in hits] == [gallery["image_pids"][i] for i in expected]


def test_gallery_is_encoded_once_and_recomputed_when_the_checkpoint_changes(tiny_run, tmp_path,
                                                                            count_image_encodings):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    first = open_gallery(config, data)
    assert count_image_encodings["images"] == 12
    cache = cache_path(open_run(config, root_dir=data, device="cpu"), "test")
    assert os.path.isfile(cache) and not glob.glob(cache + ".tmp*")
    again = open_gallery(config, data)
    assert count_image_encodings["images"] == 12, "a current cache must not be re-encoded"
    assert again.from_cache and torch.equal(again.feats, first.feats) and again.paths == first.paths

    # New weights in best.pth: the cache is stale, the gallery is encoded again and the scores follow.
    checkpoint = os.path.join(os.path.dirname(config), "best.pth")
    saved = torch.load(checkpoint, weights_only=True)
    saved["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, checkpoint)
    (hits,) = search.run(search.parse_args(search_argv(config, data, "--query", QUERIES[0],
                                                       "--out", str(tmp_path / "r.png"))))
    assert count_image_encodings["images"] == 24
    scores, _ = direct_scores(config, data, QUERIES[:1])
    expected = torch.sort(scores[0], descending=True, stable=True).indices[:10].tolist()
    assert [h.index for h in hits] == expected
    assert [h.score for h in hits] == pytest.approx(scores[0][expected].tolist(), abs=1e-5)


def test_cache_follows_the_gallery_files_and_rebuild_flag(tiny_run, tmp_path, count_image_encodings):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    first = open_gallery(config, data)
    assert not first.from_cache and count_image_encodings["images"] == 12
    assert open_gallery(config, data).from_cache
    assert not open_gallery(config, data, rebuild=True).from_cache and count_image_encodings["images"] == 24
    # The same images under another root: other paths, so the cache does not apply.
    moved = str(shutil.copytree(data, tmp_path / "moved"))
    assert not open_gallery(config, moved).from_cache and count_image_encodings["images"] == 36
    assert open_gallery(config, moved).from_cache
    # One image rewritten in place: its size or time changes, so the cache is rebuilt.
    image = sorted(glob.glob(os.path.join(moved, "CUHK-PEDES", "imgs", "test_query", "*.jpg")))[0]
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image, quality=50)
    os.utime(image, ns=(1, 1))
    changed = open_gallery(config, moved)
    assert not changed.from_cache and count_image_encodings["images"] == 48
    assert torch.equal(changed.feats[1:], first.feats[1:]) and not torch.allclose(changed.feats[0], first.feats[0])
    # The val split has its own cache file, which leaves the test split's alone.
    assert not open_gallery(config, data, split="val").from_cache and count_image_encodings["images"] == 52
    assert open_gallery(config, moved).from_cache and count_image_encodings["images"] == 52


def test_damaged_cache_is_rebuilt(tiny_run, tmp_path, count_image_encodings):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    cache = cache_path(open_run(config, root_dir=data, device="cpu"), "test")
    os.makedirs(os.path.dirname(cache))
    with open(cache, "wb") as handle:
        handle.write(b"not a torch file")
    gallery = open_gallery(config, data)
    assert not gallery.from_cache and count_image_encodings["images"] == 12
    assert torch.equal(torch.load(cache, weights_only=True)["feats"], gallery.feats)


@pytest.mark.parametrize("fault", ["nan", "wrong width", "one row short"])
def test_cache_with_a_valid_key_but_bad_features_is_rebuilt(tiny_run, tmp_path, count_image_encodings, caplog, fault):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    good = open_gallery(config, data)
    cache = cache_path(open_run(config, root_dir=data, device="cpu"), "test")
    saved = torch.load(cache, weights_only=True)
    if fault == "nan":
        saved["feats"][3, 0] = float("nan")
    elif fault == "wrong width":
        saved["feats"] = torch.cat([saved["feats"], saved["feats"]], dim=1)
    else:
        saved["feats"] = saved["feats"][1:]
    torch.save(saved, cache)  # the key is still the current one
    rebuilt = open_gallery(config, data)
    assert not rebuilt.from_cache and count_image_encodings["images"] == 24
    assert torch.equal(rebuilt.feats, good.feats) and "re-encoding" in caplog.text
    assert open_gallery(config, data).from_cache  # the rebuilt cache is used again


def test_pictures_are_pngs_of_the_laid_out_size(tiny_run, tmp_path, capsys, caplog):
    config, data = tiny_run
    queries_file = tmp_path / "queries.txt"
    queries_file.write_text(f"{QUERIES[1]}\n\n", encoding="utf-8")
    long_query = "a woman in a long red coat " * 12
    cli = search.parse_args(search_argv(config, data, "--query", long_query, "--queries_file", str(queries_file),
                                        "--topk", "4", "--out", str(tmp_path / "pics" / "result.png")))
    assert cli.queries == [long_query.strip(), QUERIES[1]]
    results = search.run(cli)
    printed = capsys.readouterr().out
    assert "only its first 48 are used" in caplog.text  # the long query is cut to the run's text_length
    handle = open_run(config, root_dir=data, device="cpu")
    for i, (query, hits) in enumerate(zip(cli.queries, results), start=1):
        path = tmp_path / "pics" / f"result_{i}.png"
        assert f"picture: {path}" in printed and hits[0].path in printed
        with Image.open(path) as img:
            assert img.format == "PNG"
            subtitle = search.describe(4, 12, "test", handle.run_dir, handle.checkpoint)
            assert img.size == ranking_size(quote(query), search.hit_groups(hits), subtitle)
    pics = tmp_path / "pics"
    with Image.open(pics / "result_1.png") as wrapped, Image.open(pics / "result_2.png") as one:
        assert wrapped.width == one.width and wrapped.height > one.height  # the long query wraps
    wide = search.hit_groups(results[0] * 3)
    assert ranking_size("q", wide)[0] > ranking_size("q", search.hit_groups(results[0]))[0]


def test_default_pictures_go_to_the_run_folder_one_file_per_query(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    chinese = "穿红色外套、背黑色双肩包的女人"
    long_query = "a man " + "in a very long blue coat " * 20
    for query in (QUERIES[0], QUERIES[1], chinese, long_query):
        assert search.main(search_argv(config, data, "--query", query, "--topk", "2")) == 0
    pictures = sorted(os.listdir(tmp_path / "run" / "search"))
    assert len(pictures) == 4  # nothing overwritten
    assert "a-woman-in-a-red-coat-with-a-black-backp-" + search.query_slug(QUERIES[0])[-8:] + ".png" in pictures
    assert search.query_slug(chinese).startswith("query-") and len(search.query_slug(long_query)) <= 49
    assert all(name.isascii() and len(name) < 60 for name in pictures)
    printed = capsys.readouterr().out
    for name in pictures:
        assert f"picture: {tmp_path / 'run' / 'search' / name}" in printed
        with Image.open(tmp_path / "run" / "search" / name) as img:
            assert img.format == "PNG" and img.width > 500


@pytest.mark.parametrize("extra, message", [
    (["--query", QUERIES[0], "--split", "train"], "--split must be test or val"),
    (["--query", "   "], "--query is empty"),
    ([], "no query"),
    (["--query", QUERIES[0], "--topk", "0"], "--topk must be between 1"),
    (["--query", QUERIES[0], "--out", "result.jpg"], "must name a .png file"),
    (["--queries_file", "/nonexistent/queries.txt"], "cannot read --queries_file"),
    (["--query", QUERIES[0], "--device", "tpu"], "--device"),
])
def test_bad_flags_are_explained(tiny_run, extra, message, capsys):
    config, data = tiny_run
    assert search.main(search_argv(config, data, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_empty_queries_file(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert search.main(search_argv(config, data, "--queries_file", str(empty))) == 2
    assert "holds no query" in capsys.readouterr().err


def test_missing_run_folder_and_checkpoint(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    assert search.main(search_argv(str(tmp_path / "nowhere" / "configs.yaml"), data, "--query", "x")) == 2
    assert "run folder" in capsys.readouterr().err
    run_dir = tmp_path / "no_weights"
    run_dir.mkdir()
    shutil.copy2(config, run_dir)
    assert search.main(search_argv(str(run_dir / "configs.yaml"), data, "--query", "x")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "best.pth" in err


def test_missing_dataset_and_split(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    assert search.main(search_argv(config, str(tmp_path / "no_data"), "--query", "x")) == 2
    assert "error: Dataset root" in capsys.readouterr().err
    root = tmp_path / "no_val"
    from datasets.synthetic import write_synthetic

    write_synthetic(root, "CUHK-PEDES", num_ids=8, images_per_id=1, num_test_ids=2, num_val_ids=0,
                    image_size=(32, 16))
    assert search.main(search_argv(config, str(root), "--query", "x", "--split", "val")) == 2
    assert "has no 'val' images; use --split test" in capsys.readouterr().err

"""visualize.py on a tiny run trained on synthetic data: rankings, failure pictures, caption choice, bad input."""

import os
import shutil

import pytest
import torch
from PIL import Image

import visualize
from test_search import copy_run, direct_scores, search_argv, tiny_run  # noqa: F401  (tiny_run is a fixture)
from processor.gallery import load_gallery, load_split
from utils.metrics import rank
from processor.run_loading import load_run_model, open_run
from processor.visualization import OTHER_COLOUR, SAME_COLOUR, quote, ranking_size


def colour_pixels(img, colour, tolerance=40):
    """How many pixels of ``img`` are within ``tolerance`` (per channel) of the ``#rrggbb`` colour."""
    target = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = torch.as_tensor(bytearray(img.convert("RGB").tobytes())).view(-1, 3).int()
    return int(((pixels - target).abs() <= tolerance).all(dim=1).sum())


def test_rankings_match_the_model_and_the_metrics(tiny_run, tmp_path):
    config, data = tiny_run
    cli = visualize.parse_args(search_argv(config, data, "--query_index", "5", "0", "5", "11", "--topk", "4",
                                           "--max_lower", "1", "--out", str(tmp_path)))
    results = visualize.run(cli)
    assert [r.index for r in results] == [5, 0, 11]  # as asked, duplicates dropped
    scores, gallery = direct_scores(config, data, [r.caption for r in results])
    g_pids = gallery["image_pids"]
    for result, row in zip(results, scores):
        assert result.pid == gallery["caption_pids"][result.index]
        order = torch.sort(row, descending=True, stable=True).indices.tolist()
        assert [h.index for h in result.top] == order[:4]
        assert result.correct_ranks == [r + 1 for r, i in enumerate(order) if g_pids[i] == result.pid]
        assert [h.rank for h in result.lower] == [r for r in result.correct_ranks if r > 4][:1]
        # Top-k indices and AP agree with utils.metrics on the same similarities.
        _, mAP, _, indices = rank(row[None], [result.pid], g_pids, max_rank=4)
        assert indices[0].tolist() == order[:4]
        assert result.ap == pytest.approx(float(mAP), abs=1e-3)


def test_failure_pictures_frame_right_and_wrong_images(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    out = tmp_path / "pics"
    results = visualize.run(visualize.parse_args(search_argv(config, data, "--num_queries", "2", "--seed", "1",
                                                             "--out", str(out))))
    printed = capsys.readouterr().out
    assert len(results) == 2
    for result in results:
        picture = out / f"caption_{result.index}.png"
        assert str(picture) in printed
        with Image.open(picture) as img:
            assert img.format == "PNG"
            subtitle = visualize.describe(result, "test", 24, 12)
            assert img.size == ranking_size(quote(result.caption), visualize.result_groups(result), subtitle)
            top_tiles = visualize.result_groups(result)[0].tiles
            assert [t.colour for t in top_tiles] == [SAME_COLOUR if h.pid == result.pid else OTHER_COLOUR
                                                     for h in result.top]
            # Each frame is at least a few hundred pixels of its colour (the images may add more).
            same = sum(h.pid == result.pid for h in result.top)
            assert colour_pixels(img, SAME_COLOUR) > 500 * same
            assert colour_pixels(img, OTHER_COLOUR) > 500 * (len(result.top) - same)
        assert f"{result.ap:.1f}" in printed


def test_lower_ranked_correct_images_get_their_own_group(tiny_run):
    config, data = tiny_run
    handle = open_run(config, root_dir=data, device="cpu", num_workers=0)
    model = load_run_model(handle)
    split = load_split(handle.args, "test")
    results = visualize.analyse(model, handle, load_gallery(model, handle, "test", split), split, range(24),
                                topk=1, max_lower=5)
    missed = [r for r in results if r.correct_ranks[0] > 1]
    assert missed, "a one-epoch model should miss some captions at rank 1"
    for result in missed:
        groups = visualize.result_groups(result)
        assert len(groups) == 2 and all(t.colour == SAME_COLOUR for t in groups[1].tiles)
        assert "ranked lower" in groups[1].heading
        assert [h.rank for h in result.lower] == result.correct_ranks[:len(result.lower)]
        subtitle = visualize.describe(result, "test", 24, 12)
        assert f"first correct image at rank {result.correct_ranks[0]}" in subtitle


def test_random_choice_is_seeded():
    first = visualize.choose_captions(100, None, 8, seed=3)
    assert first == visualize.choose_captions(100, None, 8, seed=3)
    assert first != visualize.choose_captions(100, None, 8, seed=4)
    assert len(set(first)) == 8 and first == sorted(first)
    assert visualize.choose_captions(5, None, 8, seed=0) == [0, 1, 2, 3, 4]


def test_caption_without_a_correct_image_is_described():
    result = visualize.CaptionResult(3, "a man", 77, top=[], correct_ranks=[], lower=[], ap=float("nan"))
    assert "hold no image of person 77" in visualize.describe(result, "test", 10, 5)


@pytest.mark.parametrize("extra, message", [
    (["--query_index", "24"], "--query_index 24 is out of range: the split has 24 captions"),
    (["--query_index", "-1"], "0-based"),
    (["--num_queries", "0"], "--num_queries must be at least 1"),
    (["--split", "train"], "--split must be test or val"),
    (["--topk", "31"], "--topk must be between 1 and 30"),
    (["--max_lower", "-2"], "--max_lower"),
])
def test_bad_flags_are_explained(tiny_run, tmp_path, extra, message, capsys):
    config, data = tiny_run
    assert visualize.main(search_argv(config, data, "--out", str(tmp_path), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_run_folder_and_checkpoint(tiny_run, tmp_path, capsys):
    config, data = tiny_run
    assert visualize.main(search_argv(str(tmp_path / "gone" / "configs.yaml"), data)) == 2
    assert "run folder" in capsys.readouterr().err
    run_dir = tmp_path / "no_weights"
    run_dir.mkdir()
    shutil.copy2(config, run_dir)
    assert visualize.main(search_argv(str(run_dir / "configs.yaml"), data)) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    out_file = tmp_path / "file.png"
    out_file.write_bytes(b"")
    assert visualize.main(search_argv(config, data, "--out", str(out_file))) == 2
    assert "is a file" in capsys.readouterr().err


def test_default_folder_is_in_the_run(tiny_run, tmp_path):
    config, data = tiny_run
    config = copy_run(config, tmp_path / "run")
    assert visualize.main(search_argv(config, data, "--query_index", "2")) == 0
    assert os.path.isfile(tmp_path / "run" / "visualize" / "caption_2.png")


def test_chinese_text_wraps_by_width_and_asks_for_a_cjk_font(tmp_path, caplog, monkeypatch):
    from processor import visualization
    from utils import fonts

    monkeypatch.setattr(fonts, "_warned", False)  # the warning comes once per process: earlier tests may have had it

    text = "穿红色外套、背着黑色双肩包的年轻女子走在路上" * 3
    lines = visualization._wrap(text, 3.0, 14)  # 3 inches at 14 pt: about 29 narrow units, 14 Chinese characters
    assert "".join(lines) == text and len(lines) > 2
    assert all(sum(2 if visualization.is_full_width(c) else 1 for c in line) <= 29 for line in lines)
    assert visualization._wrap("a man in a blue coat", 3.0, 14) == ["a man in a blue coat"]
    image = tmp_path / "person.png"
    from PIL import Image

    Image.new("RGB", (16, 32), (200, 10, 10)).save(image)
    group = visualization.TileGroup("前 1 名", [visualization.Tile(str(image), "#1  0.900\nid 3")])
    with caplog.at_level("WARNING"):
        size = visualization.draw_ranking(str(tmp_path / "zh.png"), text, [group])
    assert size == visualization.ranking_size(text, [group])
    from utils.fonts import find_cjk_font

    if find_cjk_font() is None:
        assert "fonts-noto-cjk" in caplog.text

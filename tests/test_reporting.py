"""Honest model selection and what a run reports: the hold-out split, the test-selection warning, results.json and
results.jsonl."""
import json
import os

import pytest

import test as test_entry
import train as train_entry
from datasets import load_benchmark
from datasets.pedes import build_dataset, holdout_identities
from datasets.synthetic import write_synthetic
from processor.reporting import metric_rows, parse_task_key
from utils.options import get_args

TINY = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "32", "16", "--text_length", "32",
        "--batch_size", "8", "--test_batch_size", "16", "--num_workers", "0", "--device", "cpu", "--precision",
        "fp32", "--loss_names", "sdm", "--num_epoch", "2", "--optimizer", "AdamW", "--lr", "1e-3",
        "--log_period", "5"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    write_synthetic(str(root / "icfg"), "ICFG-PEDES", num_ids=60, seed=4, images_per_id=2, image_size=(32, 16),
                    num_test_ids=10)
    write_synthetic(str(root / "cuhk"), "CUHK-PEDES", num_ids=20, seed=4, images_per_id=2, image_size=(32, 16),
                    num_test_ids=5, num_val_ids=3, languages=["en", "ch"])
    return root


def test_holdout_identities_are_a_fixed_share():
    ids = list(range(1, 401))
    held = holdout_identities(ids, 0.05)
    assert len(held) == 20 and held == sorted(held) and set(held) <= set(ids)
    assert holdout_identities(list(reversed(ids)), 0.05) == held  # the order of the file does not matter
    assert holdout_identities(ids, 0.0) == [] and len(holdout_identities(ids[:3], 0.05)) == 1
    assert holdout_identities([7], 0.5) == []  # a single identity is never held out (nothing would train)


def test_icfg_holds_out_training_identities_disjoint_from_training_and_test(roots):
    args = get_args(["--dataset_name", "ICFG-PEDES", "--root_dir", str(roots / "icfg")])
    assert args.val_dataset == "val"  # the default selects on validation data, never on the test split
    dataset = load_benchmark(args, verbose=False)
    again = load_benchmark(args, verbose=False)
    whole = build_dataset("ICFG-PEDES", str(roots / "icfg"), verbose=False)
    held = set(dataset.val["image_pids"])
    assert whole.num_classes == 50
    assert held == dataset.held_out_ids == again.held_out_ids and len(held) == 2  # 5% of 50 training ids, rounded
    assert held.isdisjoint(dataset.test["image_pids"]) and held <= {s[0] for s in whole.train}
    train_paths = {s[2] for s in dataset.train}
    assert train_paths.isdisjoint(dataset.val["img_paths"])
    assert dataset.num_classes == 48 and {s[0] for s in dataset.train} == set(range(48))
    # Selecting on the test split holds nothing out (the papers' protocol).
    test_args = get_args(["--dataset_name", "ICFG-PEDES", "--root_dir", str(roots / "icfg"), "--val_dataset", "test"])
    assert load_benchmark(test_args, verbose=False).val is None


def test_multilingual_holdout_is_the_same_in_every_language(roots):
    english = load_benchmark(get_args(["--root_dir", str(roots / "cuhk"), "--languages", "en"]), verbose=False)
    both = load_benchmark(get_args(["--model", "biirra", "--root_dir", str(roots / "cuhk"), "--languages", "en,ch"]),
                          verbose=False)
    assert english.val["image_pids"] == both.val["image_pids"] and both.val["image_pids"]
    assert set(both.val["captions_by_lang"]) == {"en", "ch"}
    assert len(both.val["captions_by_lang"]["en"]) == len(both.val["captions_by_lang"]["ch"])


def test_task_keys_and_rows():
    assert parse_task_key("t2i") == ("t2i", None, "final")
    assert parse_task_key("t2i-ch-stage1") == ("t2i", "ch", "stage1")
    assert parse_task_key("i2t-en") == ("i2t", "en", "final")
    rows = metric_rows({"t2i-en": {"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0, "mINP": 5.0}}, "best")
    assert rows == [{"checkpoint": "best", "language": "en", "stage": "final", "task": "t2i", "R1": 1.0, "R5": 2.0,
                     "R10": 3.0, "mAP": 4.0, "mINP": 5.0}]


def only_run(out):
    base = os.path.join(out, "ICFG-PEDES")
    [run] = os.listdir(base)
    return os.path.join(base, run)


@pytest.mark.parametrize("selection", ["val", "test"])
def test_results_json_and_the_test_selection_warning(roots, tmp_path, selection):
    out = str(tmp_path / "logs")
    assert train_entry.main(["--dataset_name", "ICFG-PEDES", "--root_dir", str(roots / "icfg"), "--output_dir", out,
                             "--val_dataset", selection, "--seed", "3", *TINY]) == 0
    run = only_run(out)
    log = open(os.path.join(run, "train_log.txt")).read()
    warned = "the checkpoint is chosen on the test set; its score is optimistic" in log
    assert warned == (selection == "test")
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["format"] == 1 and results["method"] == "irra" and results["dataset"] == "ICFG-PEDES"
    assert results["seed"] == 3 and results["num_epoch"] == 2 and 1 <= results["best_epoch"] <= 2
    assert results["selection_split"] == ("holdout" if selection == "val" else "test")
    assert results["wall_time_s"] > 0 and results["samples_per_s"] > 0 and results["code_version"]
    rows = {(r["checkpoint"], r["task"]): r for r in results["metrics"]}
    assert set(rows) == {("best", "t2i"), ("last", "t2i")}
    assert all(r["language"] is None and r["stage"] == "final" for r in rows.values())
    # test.py on best.pth gives the same test metrics and appends them to results.jsonl.
    tested = test_entry.run(test_entry.parse_args(["--config_file", os.path.join(run, "configs.yaml"),
                                                   "--device", "cpu"]))
    for metric in ("R1", "R5", "R10", "mAP", "mINP"):
        assert tested["t2i"][metric] == pytest.approx(rows[("best", "t2i")][metric], abs=1e-4)
    [line] = open(os.path.join(run, "results.jsonl")).read().splitlines()
    record = json.loads(line)
    assert record["metrics"][0]["checkpoint"] == "best.pth" and record["method"] == "irra"

"""tools/collect_results.py: reading runs, grouping by settings, mean ± sample std, tables, plot, bad input."""

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from tools import collect_results as cr
from utils.iotools import save_train_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Three seeds of one setting; the hand-computed statistics below are the expected answers.
SEED_METRICS = {
    1: {"R1": 70.0, "R5": 85.0, "R10": 90.0, "mAP": 60.0, "mINP": 40.0},
    2: {"R1": 72.0, "R5": 86.0, "R10": 91.0, "mAP": 62.0, "mINP": 43.0},
    3: {"R1": 77.0, "R5": 90.0, "R10": 92.0, "mAP": 64.0, "mINP": 46.0},
}
# R1: mean 219/3 = 73; deviations -3, -1, 4; squares 9 + 1 + 16 = 26; sample variance 26/2 = 13; std sqrt(13).
# R5: mean 87; deviations -2, -1, 3 -> 14/2 = 7; R10: mean 91; -1, 0, 1 -> 2/2 = 1; mAP: mean 62; -2, 0, 2 -> 8/2 = 4;
# mINP: mean 43; -3, 0, 3 -> 18/2 = 9.  (The population std of R1 would be sqrt(26/3) = 2.94, not 3.61.)
HAND_MEAN = {"R1": 73.0, "R5": 87.0, "R10": 91.0, "mAP": 62.0, "mINP": 43.0}
HAND_STD = {"R1": math.sqrt(13), "R5": math.sqrt(7), "R10": 1.0, "mAP": 2.0, "mINP": 3.0}
# IRRA's CUHK-PEDES paper numbers 73.38/89.93/93.71/66.13/50.24, so mean - paper:
HAND_DIFF = {"R1": -0.38, "R5": -2.93, "R10": -2.71, "mAP": -4.13, "mINP": -7.24}

CONFIG = {"model": "irra", "dataset_name": "CUHK-PEDES", "pretrain_choice": "ViT-B/16", "from_scratch": False,
          "lr": 1e-5, "batch_size": 64, "img_size": [384, 128], "loss_names": "sdm+id+mlm", "val_dataset": "val",
          "num_epoch": 60}


def metric_row(values, checkpoint="best", language=None, stage="final", task="t2i"):
    return {"checkpoint": checkpoint, "language": language, "stage": stage, "task": task, **values}


def write_run(root, folder, seed, rows, method="irra", dataset="CUHK-PEDES", selection="val", **settings):
    """A run folder as train.py leaves it: configs.yaml (every option) and results.json (format 1)."""
    run_dir = os.path.join(str(root), dataset, folder)
    config = {**CONFIG, "model": method, "dataset_name": dataset, "seed": seed, "name": folder,
              "output_dir": run_dir, "num_workers": 2 * seed, "device": f"cuda:{seed}", "world_size": seed,
              **settings}
    save_train_configs(run_dir, config)
    results = {"format": 1, "method": method, "dataset": dataset, "name": folder, "run_dir": run_dir, "seed": seed,
               "selection_split": selection, "selection_metric": "R1", "best_epoch": 20 + seed, "num_epoch": 60,
               "wall_time_s": 100.0 * seed, "samples_per_s": 50.0, "code_version": "f57c55a", "metrics": rows}
    with open(os.path.join(run_dir, "results.json"), "w") as handle:
        json.dump(results, handle)
    return run_dir


def three_seeds(root, **settings):
    """The three runs of SEED_METRICS; their ``last`` rows are the ``best`` ones minus one point."""
    return [write_run(root, f"2024010{seed}_100000_irra", seed,
                      [metric_row(values), metric_row({k: v - 1 for k, v in values.items()}, checkpoint="last")],
                      **settings)
            for seed, values in SEED_METRICS.items()]


def test_mean_and_sample_std_are_the_hand_numbers(tmp_path):
    three_seeds(tmp_path)
    rows, notes = cr.collect([str(tmp_path)])
    assert notes == [] and len(rows) == 1  # seeds, names, folders, workers, device and world size may differ
    row = rows[0]
    assert (row.group.method, row.group.dataset, row.language, row.stage, row.n) == ("irra", "CUHK-PEDES", None,
                                                                                     "final", 3)
    assert [run.seed for run in row.group.runs] == [1, 2, 3]
    for metric in cr.METRICS:
        mean, std = row.stats(metric)
        assert mean == pytest.approx(HAND_MEAN[metric]) and std == pytest.approx(HAND_STD[metric])
        assert row.difference(metric) == pytest.approx(HAND_DIFF[metric])
    last = cr.collect([str(tmp_path)], checkpoint="last")[0][0]
    assert last.stats("R1") == (pytest.approx(72.0), pytest.approx(math.sqrt(13)))


def test_mean_std_of_one_run_has_no_std():
    assert cr.mean_std([4.0]) == (4.0, None)
    assert cr.mean_std([1.0, 2.0, 6.0]) == (pytest.approx(3.0), pytest.approx(math.sqrt(7)))  # (4 + 1 + 9) / 2


def test_runs_are_found_at_any_depth_and_a_run_folder_is_a_path(tmp_path):
    runs = three_seeds(tmp_path / "logs")
    (tmp_path / "logs" / "CUHK-PEDES" / "unfinished_run").mkdir()  # no results.json: not a run
    assert cr.find_runs([str(tmp_path / "logs")]) == sorted(runs)
    assert cr.find_runs([runs[1], runs[1] + "/results.json", str(tmp_path)]) == sorted(runs)  # each run once
    rows, _ = cr.collect([runs[0], runs[2]])
    assert rows[0].values["R1"] == [70.0, 77.0] and rows[0].stats("R1")[1] == pytest.approx(math.sqrt(24.5))


def test_different_lr_is_a_separate_group_with_the_reason(tmp_path):
    three_seeds(tmp_path)
    write_run(tmp_path, "20240201_100000_irra", 1, [metric_row(SEED_METRICS[1])], lr=2e-5)
    write_run(tmp_path, "20240202_100000_irra", 2, [metric_row(SEED_METRICS[2])], lr=2e-5)
    rows, notes = cr.collect([str(tmp_path)])
    assert notes == ["2 groups of irra on CUHK-PEDES differ in lr (1e-05 vs 2e-05); they are not averaged together"]
    assert [(r.group.label, r.n) for r in rows] == [("lr=1e-05", 3), ("lr=2e-05", 2)]
    assert rows[0].stats("R1") == (pytest.approx(73.0), pytest.approx(math.sqrt(13)))  # not mixed with lr 2e-05
    assert rows[1].stats("R1") == (pytest.approx(71.0), pytest.approx(math.sqrt(2)))  # 70, 72
    text = cr.run(cr.parse_args([str(tmp_path)]))
    assert "| irra (lr=2e-05) | CUHK-PEDES |" in text
    assert "Note: 2 groups of irra on CUHK-PEDES differ in lr (1e-05 vs 2e-05)" in text


def test_several_settings_and_a_missing_one_are_named(tmp_path):
    write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1])])
    write_run(tmp_path, "b", 1, [metric_row(SEED_METRICS[2])], batch_size=128, img_aug=True)
    write_run(tmp_path, "c", 1, [metric_row(SEED_METRICS[3])], selection="holdout")
    _, notes = cr.collect([str(tmp_path)])
    assert notes == ["3 groups of irra on CUHK-PEDES differ in batch_size (64 vs 128 vs 64), img_aug (not set vs True "
                     "vs not set), selection_split (val vs val vs holdout); they are not averaged together"]


def test_repeated_seed_and_mixed_code_versions_are_noted(tmp_path):
    write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1])])
    b = write_run(tmp_path, "b", 1, [metric_row(SEED_METRICS[2])])
    results = json.load(open(os.path.join(b, "results.json")))
    json.dump({**results, "code_version": "0123abc-dirty"}, open(os.path.join(b, "results.json"), "w"))
    rows, notes = cr.collect([str(tmp_path)])
    assert rows[0].n == 2
    assert notes == ["irra on CUHK-PEDES: seed 1 occurs in several runs, which are averaged as if independent",
                     "irra on CUHK-PEDES: runs come from different code versions (0123abc-dirty, f57c55a)"]


def test_markdown_table_holds_the_hand_numbers(tmp_path):
    three_seeds(tmp_path)
    text = cr.run(cr.parse_args([str(tmp_path)]))
    assert ("| irra | CUHK-PEDES | \u2013 | final | val | 3 | 73.00 \u00b1 3.61 | 87.00 \u00b1 2.65 | "
            "91.00 \u00b1 1.00 | 62.00 \u00b1 2.00 | 43.00 \u00b1 3.00 |") in text
    assert "| paper | | | | | | 73.38 (-0.38) | 89.93 (-2.93) | 93.71 (-2.71) | 66.13 (-4.13) | 50.24 (-7.24) |" in text
    assert "sample standard deviation (n \u2212 1 in the denominator)" in text
    assert "\u2020" not in text  # selected on the validation split: no mark


def test_latex_table_holds_the_hand_numbers(tmp_path):
    three_seeds(tmp_path)
    text = cr.run(cr.parse_args([str(tmp_path), "--format", "latex"]))
    assert r"irra & CUHK-PEDES & -- & final & val & 3 & 73.00 $\pm$ 3.61 & 87.00 $\pm$ 2.65 & 91.00 $\pm$ 1.00 & " \
           r"62.00 $\pm$ 2.00 & 43.00 $\pm$ 3.00 \\" in text
    assert r"\quad paper & & & & & & 73.38 (-0.38) & 89.93 (-2.93) & 93.71 (-2.71) & 66.13 (-4.13) & " \
           r"50.24 (-7.24) \\" in text
    assert text.count(r"\begin{tabular}") == 1 and r"\bottomrule" in text and "\u00b1 3" not in text


def test_csv_has_mean_std_and_n_columns(tmp_path):
    three_seeds(tmp_path)
    write_run(tmp_path, "single", 5, [metric_row(SEED_METRICS[1])], dataset="RSTPReid")
    lines = list(csv.DictReader(io.StringIO(cr.run(cr.parse_args([str(tmp_path), "--format", "csv"])))))
    assert [(line["method"], line["dataset"], line["n"], line["seeds"]) for line in lines] == [
        ("irra", "CUHK-PEDES", "3", "1;2;3"), ("irra", "RSTPReid", "1", "5")]
    cuhk, rstp = lines
    for metric in cr.METRICS:
        assert float(cuhk[f"{metric}_mean"]) == pytest.approx(HAND_MEAN[metric])
        assert float(cuhk[f"{metric}_std"]) == pytest.approx(HAND_STD[metric], abs=1e-4)
        assert float(cuhk[f"{metric}_diff"]) == pytest.approx(HAND_DIFF[metric])
        assert rstp[f"{metric}_std"] == ""  # one run: no std
    assert cuhk["R1_std"] == "3.6056" and cuhk["R1_paper"] == "73.38" and cuhk["chosen_on_test"] == "0"
    assert (rstp["R1_paper"], rstp["R1_diff"]) == ("60.20", "9.8000")  # 70 - 60.20


def test_single_run_is_shown_without_std(tmp_path):
    write_run(tmp_path, "one", 1, [metric_row(SEED_METRICS[2])])
    text = cr.run(cr.parse_args([str(tmp_path)]))
    assert "| val | 1 (no std) | 72.00 | 86.00 | 91.00 | 62.00 | 43.00 |" in text


def test_test_selection_is_marked(tmp_path, capsys):
    write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1]), metric_row(SEED_METRICS[2], checkpoint="last")],
              dataset="ICFG-PEDES", selection="test", val_dataset="test")
    markdown = cr.run(cr.parse_args([str(tmp_path)]))
    assert "| irra | ICFG-PEDES | \u2013 | final | test\u2020 | 1 (no std) |" in markdown
    assert "\u2020 checkpoint chosen on the test set; optimistic." in markdown
    latex = cr.run(cr.parse_args([str(tmp_path), "--format", "latex"]))
    assert r"& test$^\dagger$ &" in latex and r"$^\dagger$ checkpoint chosen on the test set; optimistic." in latex
    line = next(csv.DictReader(io.StringIO(cr.run(cr.parse_args([str(tmp_path), "--format", "csv"])))))
    assert (line["selection_split"], line["chosen_on_test"]) == ("test", "1")
    last = cr.run(cr.parse_args([str(tmp_path), "--checkpoint", "last"]))  # the last epoch was not chosen at all
    assert "\u2020" not in last and "| test | 1 (no std) | 72.00 |" in last


def test_languages_and_stages_get_their_own_rows_and_paper(tmp_path):
    rows = [metric_row({k: v + i for k, v in SEED_METRICS[1].items()}, language=language, stage=stage)
            for i, (language, stage) in enumerate([("en", "final"), ("ch", "stage1"), ("ch", "final"),
                                                   ("en", "stage1")])]
    write_run(tmp_path, "a", 1, rows, method="biirra")
    write_run(tmp_path, "b", 2, rows, method="biirra")
    found, _ = cr.collect([str(tmp_path)])
    assert [(r.language, r.stage, r.values["R1"]) for r in found] == [  # languages as listed, stage1 first
        ("en", "stage1", [73.0, 73.0]), ("en", "final", [70.0, 70.0]),
        ("ch", "stage1", [71.0, 71.0]), ("ch", "final", [72.0, 72.0])]
    papers = [r.paper for r in found]
    assert papers[0] is None and papers[2] is None  # no published first-stage numbers
    assert papers[3] == {"R1": 76.43, "R5": 90.72, "R10": 94.79, "mAP": 67.79, "mINP": None}
    assert found[1].difference("R1") == pytest.approx(70.0 - 78.82) and found[1].difference("mINP") is None
    text = cr.format_markdown(found, [])
    # Chinese final stage: R1/R5/R10/mAP = 72/87/92/62 against 76.43/90.72/94.79/67.79; no published mINP
    assert "| paper | | | | | | 76.43 (-4.43) | 90.72 (-3.72) | 94.79 (-2.79) | 67.79 (-5.79) | \u2013 |" in text


def test_paper_table(tmp_path):
    assert cr.paper_numbers("irra", "ICFG-PEDES", None) == {"R1": 63.46, "R5": 80.24, "R10": 85.82, "mAP": 38.05,
                                                           "mINP": 7.92}
    assert cr.paper_numbers("php", "CUHK-PEDES", "en")["R10"] is None
    assert cr.paper_numbers("ivt", "RSTPReid", None) == {"R1": 46.70, "R5": 70.00, "R10": 78.80, "mAP": None,
                                                        "mINP": None}
    assert cr.paper_numbers("biirra", "UFine6926", "ch")["mAP"] == 89.22
    assert cr.paper_numbers("irra", "UFine6926", None) is None and cr.paper_numbers("irra", "CUHK-PEDES", "ch") is None
    write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1])], method="ivt", dataset="UFine6926")
    text = cr.run(cr.parse_args([str(tmp_path)]))
    assert "| paper |" not in text and "published" not in text  # no reference row where the paper has none


def test_ablations_and_the_demo_get_no_paper_row(tmp_path):
    write_run(tmp_path, "full", 1, [metric_row(SEED_METRICS[1])], loss_names="mlm+sdm+id")  # same losses, any order
    write_run(tmp_path, "clip_sdm", 1, [metric_row(SEED_METRICS[2])], loss_names="sdm")
    write_run(tmp_path, "demo", 1, [metric_row(SEED_METRICS[3])], pretrain_choice="tiny", from_scratch=True)
    rows, notes = cr.collect([str(tmp_path)])
    assert [(r.group.label, r.group.off_recipe, r.paper is not None) for r in rows] == [  # in folder order
        ("from_scratch=False, loss_names=sdm, pretrain_choice=ViT-B/16", ["loss_names=sdm"], False),
        ("from_scratch=True, loss_names=sdm+id+mlm, pretrain_choice=tiny", ["from_scratch=True",
                                                                            "pretrain_choice=tiny"], False),
        ("from_scratch=False, loss_names=mlm+sdm+id, pretrain_choice=ViT-B/16", [], True)]
    assert notes[1:] == [
        "irra on CUHK-PEDES (from_scratch=False, loss_names=sdm, pretrain_choice=ViT-B/16): no paper row, the "
        "published numbers are for another recipe (loss_names=sdm)",
        "irra on CUHK-PEDES (from_scratch=True, loss_names=sdm+id+mlm, pretrain_choice=tiny): no paper row, the "
        "published numbers are for another recipe (from_scratch=True, pretrain_choice=tiny)"]
    assert cr.format_markdown(rows, notes).count("| paper |") == 1


def test_more_than_three_differing_settings_number_the_groups(tmp_path):
    write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1])])
    write_run(tmp_path, "b", 1, [metric_row(SEED_METRICS[2])], lr=2e-5, batch_size=128, num_epoch=30, gamma=0.5)
    rows, notes = cr.collect([str(tmp_path)])
    assert [r.group.label for r in rows] == ["settings 1", "settings 2"]
    assert notes == ["2 groups of irra on CUHK-PEDES differ in batch_size (64 vs 128), gamma (not set vs 0.5), lr "
                     "(1e-05 vs 2e-05), num_epoch (60 vs 30) (values of settings 1, 2 in that order); they are not "
                     "averaged together"]


def test_plot_is_a_png_with_a_line_per_row(tmp_path, capsys):
    three_seeds(tmp_path)
    write_run(tmp_path, "single", 5, [metric_row(SEED_METRICS[1])], dataset="ICFG-PEDES", selection="test")
    out = tmp_path / "figures" / "spread.png"
    assert cr.main([str(tmp_path), "--plot", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().err
    assert out.stat().st_size > 20_000
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1360, 580)  # (2.4 * 5 + 1.6) x (2.6 * 2 + 0.6) inches, 100 dpi
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank


def test_runs_as_a_script_from_anywhere(tmp_path):
    three_seeds(tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "collect_results.py"), ".", "--format",
                           "csv"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("irra,CUHK-PEDES,,,final,best,t2i,val,0,3,1;2;3,73.0000,3.6056,")


def edit_results(run_dir, change):
    path = os.path.join(run_dir, "results.json")
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


BAD_RESULTS = [
    (lambda d: d.pop("seed"), "has no field 'seed'"),
    (lambda d: d.update(seed="one"), "field 'seed' must be an integer, found \"one\""),
    (lambda d: d.update(method=None), "field 'method' must be a string, found null"),
    (lambda d: d.update(format=2), "field 'format' is 2; this tool reads format 1"),
    (lambda d: d.update(selection_split="train"), "field 'selection_split' is 'train'; expected one of val, "
                                                  "holdout, test"),
    (lambda d: d.update(metrics=[]), "field 'metrics' is empty"),
    (lambda d: d.update(metrics={"R1": 1}), "field 'metrics' must be a list"),
    (lambda d: d["metrics"][1].pop("mAP"), "has no field 'metrics[1].mAP'"),
    (lambda d: d["metrics"][0].update(R5="high"), "field 'metrics[0].R5' must be a number, found \"high\""),
    (lambda d: d["metrics"][0].update(R5=True), "field 'metrics[0].R5' must be a number, found true"),
    (lambda d: d["metrics"][0].update(R1=float("nan")), "field 'metrics[0].R1' is nan; a metric must be a finite"),
    (lambda d: d["metrics"][0].update(language=1), "field 'metrics[0].language' must be a language code or null"),
    (lambda d: d["metrics"].append(d["metrics"][0]), "field 'metrics' has two rows for checkpoint best, language "
                                                     "null, stage final, task t2i"),
]


@pytest.mark.parametrize("change, message", BAD_RESULTS)
def test_malformed_results_name_the_file_and_field(tmp_path, capsys, change, message):
    runs = three_seeds(tmp_path)
    edit_results(runs[1], change)
    assert cr.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert os.path.join(runs[1], "results.json") in err and message in err


def test_bad_input_is_explained(tmp_path, capsys):
    def error(*argv):
        assert cr.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    assert f"no results.json below {tmp_path}" in error(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert "is not a results.json" in error(tmp_path / "notes.txt")
    run_dir = write_run(tmp_path, "a", 1, [metric_row(SEED_METRICS[1])])
    assert "must name a .png file" in error(tmp_path, "--plot", tmp_path / "spread.svg")
    assert "has no metrics for checkpoint 'last' and task 't2i' (it has best/t2i)" in error(tmp_path, "--checkpoint",
                                                                                           "last")
    assert "has no metrics for checkpoint 'best' and task 'i2t'" in error(tmp_path, "--task", "i2t")
    other = write_run(tmp_path, "b", 2, [metric_row(SEED_METRICS[1]), metric_row(SEED_METRICS[2], language="ch")])
    err = error(tmp_path)
    assert os.path.join(run_dir, "results.json") in err and "language ch, stage final" in err and "other runs" in err
    os.remove(os.path.join(other, "configs.yaml"))
    assert f"config file {os.path.join(other, 'configs.yaml')} does not exist" in error(other)
    with open(os.path.join(run_dir, "results.json"), "w") as handle:
        handle.write('{"format": 1,')
    assert f"{os.path.join(run_dir, 'results.json')} is not valid JSON (line 1" in error(run_dir)
    with open(os.path.join(run_dir, "results.json"), "w") as handle:
        handle.write("[1, 2]")
    assert "must hold a JSON object, found a list" in error(run_dir)

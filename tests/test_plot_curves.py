"""tools/plot_curves.py: parsing IRRA-style training logs and drawing the curves."""

import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from tools import plot_curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def progress(epoch, it, n, values, lr):
    parts = ", ".join(f"{k}: {v:.4f}" for k, v in values.items())
    return (f"2024-01-01 10:00:00,000 processor.processor INFO: Epoch[{epoch}] Iteration[{it}/{n}], {parts}, "
            f"Base Lr: {lr:.2e}")


def table(rows):
    lines = ["2024-01-01 10:00:01,000 utils.metrics INFO: ",
             "+------+--------+--------+--------+--------+--------+",
             "| task |   R1   |   R5   |  R10   |  mAP   |  mINP  |",
             "+------+--------+--------+--------+--------+--------+"]
    lines += [f"| {task} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for task, values in rows]
    return lines + ["+------+--------+--------+--------+--------+--------+"]


def write_log(path, epochs=4, eval_period=2):
    """A log as train.py writes it: two progress lines per epoch, validation every ``eval_period`` epochs."""
    lines = ["2024-01-01 10:00:00,000 IRRA INFO: Using 1 process(es) on cpu, precision fp32",
             "  loss_names: sdm+id+mlm"]
    for e in range(1, epochs + 1):
        for it in (5, 10):
            values = {"sdm_loss": 10.0 / e + it / 100, "id_loss": 5.0 / e, "mlm_loss": 8.0 / e,
                      "loss": 23.0 / e + it / 100, "mlm_acc": 0.1 * e}
            if e > 1:  # IRRA leaves out values that are still zero
                values.update(img_acc=0.2 * e, txt_acc=0.15 * e)
            lines.append(progress(e, it, 10, values, 1e-4 * e + it * 1e-7))
        lines.append(f"2024-01-01 10:00:00,500 processor.processor INFO: Epoch {e} done. Time per batch: 0.1[s] "
                     f"Speed: 640.0[samples/s]")
        if e % eval_period == 0:
            lines.append(f"2024-01-01 10:00:00,600 processor.processor INFO: Validation Results - Epoch: {e}")
            lines += table([("t2i", (10.0 * e, 20.0 * e, 25.0 * e, 8.0 * e, 3.0 * e)),
                            ("i2t", (1, 2, 3, 4, 5))])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_takes_each_epochs_last_line_and_the_t2i_row(tmp_path):
    log = plot_curves.read_train_log(str(write_log(tmp_path / "train_log.txt")))
    assert sorted(log.train) == [1, 2, 3, 4]
    assert log.train[2]["sdm_loss"] == pytest.approx(5.1, abs=1e-4)  # iteration 10 of 10, not 5
    assert log.train[3]["loss"] == pytest.approx(23.0 / 3 + 0.1, abs=1e-4)
    assert "img_acc" not in log.train[1] and log.train[4]["img_acc"] == pytest.approx(0.8)
    assert log.lr[3] == pytest.approx(3e-4 + 1e-6, rel=1e-2)
    assert log.val == {2: {"R1": 20.0, "R5": 40.0, "R10": 50.0, "mAP": 16.0, "mINP": 6.0},
                       4: {"R1": 40.0, "R5": 80.0, "R10": 100.0, "mAP": 32.0, "mINP": 12.0}}
    assert log.keys() == ["sdm_loss", "id_loss", "mlm_loss", "loss", "mlm_acc", "img_acc", "txt_acc"]
    assert log.series("img_acc") == ([2, 3, 4], [pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.8)])


def test_irra_released_log_lines_parse():
    lines = ["2022-11-02 14:30:12,345 IRRA.train INFO: Epoch[1] Iteration[50/1060], loss: 12.5346, "
             "sdm_loss: 10.1000, id_loss: 2.4346, Base Lr: 1.00e-06",
             "2022-11-02 15:30:12,345 IRRA.train INFO: Validation Results - Epoch: 1",
             "2022-11-02 15:30:12,345 IRRA.eval INFO: ", "+------+-------+",
             "| task |   R1   |   R5   |  R10  |  mAP  | mINP |",
             "| t2i  | 55.2 | 75.1 | 82.0 | 50.0 | nan |"]
    log = plot_curves.parse_train_log(lines)
    assert log.train == {1: {"loss": 12.5346, "sdm_loss": 10.1, "id_loss": 2.4346}} and log.lr == {1: 1e-6}
    assert log.val[1]["R1"] == 55.2 and math.isnan(log.val[1]["mINP"])


def test_validation_table_without_t2i_row_is_ignored():
    lines = ["INFO: Validation Results - Epoch: 1", "INFO: Epoch[2] Iteration[1/1], loss: 1.0, Base Lr: 1e-4",
             "| task | R1 |", "| t2i | 5.0 |"]
    assert plot_curves.parse_train_log(lines).val == {}


def test_main_writes_one_png(tmp_path, capsys):
    run_dir = tmp_path / "20240101_100000_demo"
    run_dir.mkdir()
    write_log(run_dir / "train_log.txt", epochs=6, eval_period=3)
    assert plot_curves.main([str(run_dir)]) == 0
    assert f"curves: {run_dir / 'curves.png'}" in capsys.readouterr().out
    with Image.open(run_dir / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1300, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # drawn, not blank
    out = tmp_path / "elsewhere" / "c.png"
    assert plot_curves.main([str(run_dir / "train_log.txt"), "--out", str(out)]) == 0
    assert out.is_file()


def test_runs_as_a_script_from_anywhere(tmp_path):
    write_log(tmp_path / "train_log.txt", epochs=1, eval_period=1)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_curves.py"), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").is_file()


def test_bad_input_is_explained(tmp_path, capsys):
    assert plot_curves.main([str(tmp_path / "missing")]) == 2
    assert "run folder" in capsys.readouterr().err
    assert plot_curves.main([str(tmp_path)]) == 2
    assert "holds no train_log.txt" in capsys.readouterr().err
    (tmp_path / "train_log.txt").write_text("2024 IRRA INFO: Using 1 process(es)\n")
    assert plot_curves.main([str(tmp_path)]) == 2
    assert "no training progress lines" in capsys.readouterr().err
    write_log(tmp_path / "train_log.txt")
    assert plot_curves.main([str(tmp_path), "--out", str(tmp_path / "curves.svg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "must name a .png file" in err

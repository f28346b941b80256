"""Training curves of a run, read from its ``train_log.txt``: one PNG.

    python tools/plot_curves.py logs/CUHK-PEDES/<run> [--out curves.png]

Four panels, by epoch: the losses (total and each term), the accuracies (``img_acc``, ``txt_acc``,
``mlm_acc``), the base learning rate, and the validation Rank-1/5/10, mAP and mINP with the best Rank-1
marked. Only the text log is read (it is always written; TensorBoard may be absent), in the form IRRA's
code writes it too: ``Epoch[e] Iteration[i/N], loss: x, sdm_loss: x, …, Base Lr: x`` progress lines, whose
running means at an epoch's last logged iteration are that epoch's values, and ``Validation Results - Epoch:
e`` followed by a ``| task | R1 | R5 | R10 | mAP | mINP |`` table whose ``t2i`` row is taken. The default
output is ``<run>/curves.png``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as `python tools/plot_curves.py`: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.entry import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from processor.visualization import check_picture_path  # noqa: E402

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.txt"
_PROGRESS = re.compile(r"Epoch\[(\d+)\]\s*Iteration\[(\d+)/(\d+)\],?\s*(.*)$")
_VALIDATION = re.compile(r"Validation Results - Epoch:\s*(\d+)")
_LR_KEY = "Base Lr"
VAL_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


@dataclass
class TrainingLog:
    """What a ``train_log.txt`` says, by epoch.

    Attributes:
        train: ``{epoch: {name: value}}`` from the epoch's last progress line (``loss``, ``*_loss``, ``*_acc``).
        lr: ``{epoch: base learning rate}``.
        val: ``{epoch: {'R1': …, 'R5': …, 'R10': …, 'mAP': …, 'mINP': …}}``, text-to-image, percent.
    """

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)
    val: dict[int, dict[str, float]] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Epochs and values of one training quantity (epochs where it was not logged are left out)."""
        epochs = [e for e in sorted(self.train) if key in self.train[e]]
        return epochs, [self.train[e][key] for e in epochs]

    def keys(self) -> list[str]:
        """Every training quantity that appears in the log, in order of first appearance."""
        return list(dict.fromkeys(k for e in sorted(self.train) for k in self.train[e]))


def _table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_train_log(lines: Iterable[str]) -> TrainingLog:
    """Read the per-epoch values of a training log (see the module docstring for the line forms)."""
    log = TrainingLog()
    pending: int | None = None  # epoch whose validation table is expected
    header: list[str] | None = None
    for line in lines:
        progress = _PROGRESS.search(line)
        if progress:
            epoch = int(progress.group(1))
            values: dict[str, float] = {}
            for part in progress.group(4).split(","):
                name, _, text = part.partition(":")
                value = _number(text.strip())
                if value is not None and name.strip():
                    values[name.strip()] = value
            lr = values.pop(_LR_KEY, None)
            if lr is not None:
                log.lr[epoch] = lr
            log.train[epoch] = values
            pending = None
            continue
        validation = _VALIDATION.search(line)
        if validation:
            pending, header = int(validation.group(1)), None
            continue
        if pending is not None and line.lstrip().startswith("|"):
            cells = _table_cells(line)
            if cells[0] == "task":
                header = cells
            elif cells[0] == "t2i" and header:
                row = {name: _number(cell) for name, cell in zip(header[1:], cells[1:])}
                log.val[pending] = {k: v for k, v in row.items() if k in VAL_KEYS and v is not None}
                pending = None
    return log


def find_log(path: str) -> str:
    """The ``train_log.txt`` of a run folder (or ``path`` itself when it is a log file)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"run folder {path} does not exist; pass a run folder written by train.py "
                        f"(logs/<dataset>/<time>_<name>/) or its {LOG_NAME}")
    log_file = os.path.join(path, LOG_NAME)
    if not os.path.isfile(log_file):
        raise UserError(f"{path} holds no {LOG_NAME}; is it a run folder written by train.py?")
    return log_file


def read_train_log(path: str) -> TrainingLog:
    """Parse the log at ``path``; a log without any progress line is a :class:`UserError`."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            log = parse_train_log(handle)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err})") from None
    if not log.train:
        raise UserError(f"{path} has no training progress lines (Epoch[e] Iteration[i/N], loss: …); training "
                        f"may have stopped before the first --log_period iterations")
    return log


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666", fontsize=11)
    ax.set_yticks([])


def _finish(ax, title: str, ylabel: str, epochs: tuple[int, int]) -> None:
    """Title, labels, grid and legend; the x axis spans the logged ``epochs`` (first, last) with whole ticks."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported only when a picture is drawn

    ax.set_title(title, fontsize=13, loc="left")
    ax.set_xlabel("epoch", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_xlim(epochs[0] - 0.5, epochs[1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=10, loc="best")


def _plot_losses(ax, log: TrainingLog, span: tuple[int, int]) -> None:
    keys = [k for k in log.keys() if k == "loss" or k.endswith("_loss")]
    if not keys:
        _empty(ax, "no losses in the log")
    for key in keys:
        epochs, values = log.series(key)
        total = key == "loss"
        ax.plot(epochs, values, marker="o", markersize=3, linewidth=2.0 if total else 1.6,
                linestyle="--" if total else "-", color="black" if total else None,
                label="total" if total else key.removesuffix("_loss"))
    positive = [v for k in keys for v in log.series(k)[1] if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    _finish(ax, "Training losses (epoch means)", "loss", span)


def _plot_accuracies(ax, log: TrainingLog, span: tuple[int, int]) -> None:
    keys = [k for k in log.keys() if k.endswith("_acc")]
    if not keys:
        _empty(ax, "no accuracies in the log\n(they come with the id and mlm losses)")
    for key in keys:
        epochs, values = log.series(key)
        ax.plot(epochs, [v * 100 for v in values], marker="o", markersize=3, linewidth=1.4, label=key)
    _finish(ax, "Training accuracies", "%", span)


def _plot_lr(ax, log: TrainingLog, span: tuple[int, int]) -> None:
    epochs = sorted(log.lr)
    if epochs:
        ax.plot(epochs, [log.lr[e] for e in epochs], marker="o", markersize=3, linewidth=1.6, color="#1f77b4")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _empty(ax, "no learning rate in the log")
    _finish(ax, "Base learning rate", "learning rate", span)


def _plot_validation(ax, log: TrainingLog, span: tuple[int, int]) -> None:
    epochs = sorted(log.val)
    if not epochs:
        _empty(ax, "no validation results in the log")
    for key in VAL_KEYS:
        points = [(e, log.val[e][key]) for e in epochs if key in log.val[e]]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, linewidth=2.2 if key == "R1" else 1.3, label=key)
    # The first epoch with the highest Rank-1: the one train.py saved as best.pth (it needs a strict improvement).
    with_r1 = [e for e in epochs if "R1" in log.val[e] and math.isfinite(log.val[e]["R1"])]
    if with_r1:
        best = max(with_r1, key=lambda e: log.val[e]["R1"])
        value = log.val[best]["R1"]
        ax.scatter([best], [value], s=160, facecolors="none", edgecolors="black", linewidths=1.5, zorder=5)
        right_half = best > (span[0] + span[1]) / 2
        ax.annotate(f"best R1 {value:.2f} (epoch {best})", (best, value), textcoords="offset points",
                    xytext=(-10 if right_half else 10, 12), ha="right" if right_half else "left", fontsize=10)
        ax.margins(y=0.15)
    _finish(ax, "Validation, text-to-image", "%", span)


def plot_curves(log: TrainingLog, out_path: str, title: str = "") -> tuple[int, int]:
    """Draw the four panels of ``log`` into the PNG ``out_path``; returns its ``(width, height)`` in pixels."""
    # matplotlib takes about a second to import: parsing a log (and --help) does not pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi, size = 100, (13.0, 9.0)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    (losses, accuracies), (lr, validation) = fig.subplots(2, 2)
    span = (min(log.train), max(log.train))
    _plot_losses(losses, log, span)
    _plot_accuracies(accuracies, log, span)
    _plot_lr(lr, log, span)
    _plot_validation(validation, log, span)
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=dpi, format="png", facecolor="white")
    return round(size[0] * dpi), round(size[1] * dpi)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Plot a run's losses, accuracies, learning rate and validation "
                                            "metrics per epoch from its train_log.txt.")
    p.add_argument("run_dir", help=f"the run folder (or its {LOG_NAME})")
    p.add_argument("--out", default="", help="PNG to write (default RUN_DIR/curves.png)")
    cli = p.parse_args(argv)
    check_picture_path(cli.out)
    return cli


def run(cli: argparse.Namespace) -> str:
    log_file = find_log(cli.run_dir)
    log = read_train_log(log_file)
    out = cli.out or os.path.join(os.path.dirname(os.path.abspath(log_file)), "curves.png")
    run_name = os.path.basename(os.path.dirname(os.path.abspath(log_file)))
    first, last = min(log.train), max(log.train)
    plot_curves(log, out, f"{run_name}: " + (f"epoch {first}" if first == last else f"epochs {first}\u2013{last}"))
    print(f"curves: {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

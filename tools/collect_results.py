"""Runs gathered into a paper-style table: mean ± std over seeds, beside the published numbers.

    python tools/collect_results.py logs/CUHK-PEDES [more run folders or folders of runs]
        [--format markdown|latex|csv] [--checkpoint best|last] [--task t2i|i2t] [--plot spread.png]

Every folder below the given paths that holds a ``results.json`` is one run. ``train.py`` writes that file at the
end of training, beside the run's ``configs.yaml`` (every option of the run)::

    {"format": 1, "method": "irra", "dataset": "CUHK-PEDES", "name": "irra", "run_dir": "logs/…", "seed": 1,
     "selection_split": "val",      # "val", "holdout" (held-out training identities) or "test" (optimistic)
     "selection_metric": "R1", "best_epoch": 23, "num_epoch": 60, "wall_time_s": 1234.5,
     "samples_per_s": 123.4, "code_version": "f57c55a",        # or "f57c55a-dirty" or "unknown"
     "metrics": [{"checkpoint": "best", "language": "en", "stage": "final", "task": "t2i",
                  "R1": 73.1, "R5": 89.9, "R10": 93.7, "mAP": 66.1, "mINP": 50.2}, …]}

One ``metrics`` row per (checkpoint ``best``/``last``, query language — ``null`` for a single-language dataset —,
evaluation stage — ``final``, or ``stage1`` and ``final`` for a two-stage method —, task ``t2i``/``i2t``);
metric values are percentages. This tool needs ``format``, ``method``, ``dataset``, ``seed``, ``selection_split``
and ``metrics`` with all five metrics in every row; the other fields are informative.

Runs are grouped by method and dataset, and within that by their settings: two runs are averaged only when their
``configs.yaml`` agree on everything except the settings in :data:`MAY_DIFFER` (seed, names and folders, loader
workers, logging and evaluation periods, device and process layout, time stamps, code version), and they were
selected on the same split. Otherwise they form separate groups and the tool says which settings differ. Each
group gives one table row per query language and evaluation stage: the mean over its runs, the *sample*
standard deviation (denominator n − 1; a single run has none) and the number of runs n, followed by a reference
row with the published numbers (:data:`PAPER`) and the difference mean − paper. A ``best`` checkpoint chosen on
the test split is marked † ("checkpoint chosen on the test set; optimistic"). A single-language run (language
``null``) is compared with the English numbers; a group that departs from the published recipe
(:data:`PAPER_RECIPE`: an ablation's losses, another backbone, training from scratch as in the CPU demo) gets no
reference row, with a note.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as `python tools/collect_results.py`: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.entry import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.iotools import CONFIG_NAME, read_yaml  # noqa: E402
from processor.visualization import check_picture_path  # noqa: E402

RESULTS_NAME = "results.json"
RESULTS_FORMAT = 1
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
SELECTION_SPLITS = ("val", "holdout", "test")
FORMATS = ("markdown", "latex", "csv")
TASKS = {"t2i": "Text-to-image", "i2t": "Image-to-text"}
TEST_MARK = "\u2020"  # †
TEST_NOTE = "checkpoint chosen on the test set; optimistic"

# configs.yaml keys that may differ between runs averaged together: the seed, where the run and its log went,
# how data is loaded and how often it logs and evaluates, the device and process layout, resuming, and facts
# recorded at run time. Every other setting must be equal.
MAY_DIFFER = frozenset({
    "seed", "name", "output_dir", "run_dir", "config_file",
    "num_workers", "log_period", "eval_period",
    "device", "local_rank", "world_size", "rank", "distributed", "training",
    "resume", "resume_ckpt_file",
    "start_time", "end_time", "timestamp", "code_version", "logs_root", "run_started",
})

# Published text-to-image numbers, R1/R5/R10/mAP/mINP in percent (None: not reported), by (method, dataset,
# query language). The benchmarks' own captions are English ("en"); Bi-IRRA's Chinese queries are "ch".
PAPER: dict[tuple[str, str, str], tuple[float | None, ...]] = {
    ("irra", "CUHK-PEDES", "en"): (73.38, 89.93, 93.71, 66.13, 50.24),
    ("irra", "ICFG-PEDES", "en"): (63.46, 80.24, 85.82, 38.05, 7.92),
    ("irra", "RSTPReid", "en"): (60.20, 81.30, 88.20, 47.17, 25.28),
    ("php", "CUHK-PEDES", "en"): (82.80, 93.55, None, 75.40, None),
    ("ivt", "CUHK-PEDES", "en"): (65.59, 83.11, 89.21, None, None),
    ("ivt", "ICFG-PEDES", "en"): (56.04, 73.60, 80.22, None, None),
    ("ivt", "RSTPReid", "en"): (46.70, 70.00, 78.80, None, None),
    ("biirra", "CUHK-PEDES", "en"): (78.82, 92.02, 95.47, 69.68, None),
    ("biirra", "ICFG-PEDES", "en"): (68.53, 83.04, 87.79, 41.82, None),
    ("biirra", "RSTPReid", "en"): (72.85, 87.75, 91.90, 55.60, None),
    ("biirra", "UFine6926", "en"): (90.45, 96.90, 98.18, 89.66, None),
    ("biirra", "CUHK-PEDES", "ch"): (76.43, 90.72, 94.79, 67.79, None),
    ("biirra", "ICFG-PEDES", "ch"): (66.79, 81.55, 86.44, 40.26, None),
    ("biirra", "RSTPReid", "ch"): (71.75, 87.10, 91.65, 55.77, None),
    ("biirra", "UFine6926", "ch"): (89.98, 96.56, 98.05, 89.22, None),
}


# The settings a group must have for the published numbers to be its reference row: the method as published, not
# an ablation (the CLIP+SDM baseline is `irra` with other losses) or the CPU demo (a tiny CLIP from scratch).
# Loss names compare as sets. For every method, a run with `from_scratch: true` has no reference row.
PAPER_RECIPE: dict[str, dict[str, Any]] = {
    "irra": {"loss_names": "sdm+mlm+id", "pretrain_choice": "ViT-B/16"},
    "php": {"loss_names": "sdm+itc+aux", "pretrain_choice": "ViT-B/16"},
}


def off_recipe(method: str, settings: dict[str, Any]) -> list[str]:
    """The settings in which a run departs from its method's published recipe (``"loss_names=sdm"``); a setting the
    run's configs.yaml does not hold is not held against it."""
    departures = [f"from_scratch={settings['from_scratch']}"] if settings.get("from_scratch") else []
    for key, published in PAPER_RECIPE.get(method, {}).items():
        if key not in settings:
            continue
        value = settings[key]
        same = (sorted(str(value).split("+")) == sorted(published.split("+"))) if key == "loss_names" \
            else value == published
        if not same:
            departures.append(f"{key}={value}")
    return departures


def paper_numbers(method: str, dataset: str, language: str | None) -> dict[str, float | None] | None:
    """The published ``{metric: value or None}`` of a method on a dataset and query language, or None if unknown."""
    values = PAPER.get((method, dataset, language or "en"))
    return None if values is None else dict(zip(METRICS, values))


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (denominator n − 1) of per-run values; the std of one run is None."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ----------------------------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    """One training run: what its ``results.json`` says and the settings of its ``configs.yaml``.

    Attributes:
        folder: the run folder.
        method, dataset, seed, selection_split, code_version: from ``results.json``.
        metrics: the ``metrics`` rows, checked (``checkpoint``, ``language``, ``stage``, ``task`` and the five
            metric values as floats).
        settings: ``configs.yaml`` without the keys in :data:`MAY_DIFFER`.
    """

    folder: str
    method: str
    dataset: str
    seed: int
    selection_split: str
    code_version: str
    metrics: tuple[dict[str, Any], ...]
    settings: dict[str, Any]


def find_runs(paths: Sequence[str]) -> list[str]:
    """Every folder at or below ``paths`` that holds a ``results.json`` (a path may also be that file), sorted."""
    found: dict[str, str] = {}
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist; pass run folders or folders that hold them (e.g. logs/)")
        if os.path.isfile(path):
            if os.path.basename(path) != RESULTS_NAME:
                raise UserError(f"{path} is not a {RESULTS_NAME}; pass run folders or folders that hold them")
            folder = os.path.dirname(os.path.abspath(path))
            found.setdefault(os.path.realpath(folder), folder)
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            if RESULTS_NAME in files:
                found.setdefault(os.path.realpath(folder), folder)
                subfolders.clear()  # a run folder holds no other runs
    if not found:
        raise UserError(f"no {RESULTS_NAME} below {', '.join(paths)}; train.py writes one in the run folder at the "
                        f"end of training (runs that stopped early or older runs have none)")
    return sorted(found.values())


def _field(data: dict, key: str, kinds: type | tuple[type, ...], expected: str, file: str, where: str = "") -> Any:
    """``data[key]``, which must be an instance of ``kinds`` (never a bool); ``expected`` says so in words."""
    if key not in data:
        raise UserError(f"{file} has no field '{where}{key}'; it is not a complete {RESULTS_NAME} (format "
                        f"{RESULTS_FORMAT}, see docs/results.md)")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UserError(f"{file}: field '{where}{key}' must be {expected}, found {json.dumps(value)}")
    return value


def _metric_row(row: Any, index: int, file: str) -> dict[str, Any]:
    where = f"metrics[{index}]."
    if not isinstance(row, dict):
        raise UserError(f"{file}: field 'metrics[{index}]' must be an object, found {json.dumps(row)}")
    checked: dict[str, Any] = {key: _field(row, key, str, "a string", file, where)
                               for key in ("checkpoint", "stage", "task")}
    checked["language"] = _field(row, "language", (str, type(None)), "a language code or null", file, where)
    for metric in METRICS:
        value = float(_field(row, metric, (int, float), "a number", file, where))
        if not math.isfinite(value):
            raise UserError(f"{file}: field '{where}{metric}' is {value}; a metric must be a finite number")
        checked[metric] = value
    return checked


def load_run(folder: str) -> Run:
    """Read and check ``folder/results.json`` and ``folder/configs.yaml``; any fault is a :class:`UserError`."""
    file = os.path.join(folder, RESULTS_NAME)
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as err:
        raise UserError(f"cannot read {file} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object, found a {type(data).__name__}")
    version = _field(data, "format", int, "an integer", file)
    if version != RESULTS_FORMAT:
        raise UserError(f"{file}: field 'format' is {version}; this tool reads format {RESULTS_FORMAT}")
    selection = _field(data, "selection_split", str, "a string", file)
    if selection not in SELECTION_SPLITS:
        raise UserError(f"{file}: field 'selection_split' is {selection!r}; expected one of "
                        f"{', '.join(SELECTION_SPLITS)}")
    rows = _field(data, "metrics", list, "a list", file)
    if not rows:
        raise UserError(f"{file}: field 'metrics' is empty; the run recorded no test metrics")
    metrics = tuple(_metric_row(row, i, file) for i, row in enumerate(rows))
    keys = [(m["checkpoint"], m["language"], m["stage"], m["task"]) for m in metrics]
    repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if repeated:
        raise UserError(f"{file}: field 'metrics' has two rows for checkpoint {repeated[0]}, language "
                        f"{repeated[1] or 'null'}, stage {repeated[2]}, task {repeated[3]}")
    config = read_yaml(os.path.join(folder, CONFIG_NAME))
    settings = {k: v for k, v in config.items() if k not in MAY_DIFFER}
    settings["selection_split"] = selection
    code = data.get("code_version")
    return Run(folder=folder, method=_field(data, "method", str, "a string", file),
               dataset=_field(data, "dataset", str, "a string", file),
               seed=_field(data, "seed", int, "an integer", file),
               selection_split=selection, code_version=code if isinstance(code, str) else "unknown",
               metrics=metrics, settings=settings)


# ------------------------------------------------------------------------------------------------- grouping

_ABSENT = object()


def _shown(value: Any) -> str:
    return "not set" if value is _ABSENT else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class Group:
    """Runs of one method on one dataset with equal settings.

    Attributes:
        method, dataset: what all its runs trained.
        label: the settings that set it apart from the other groups of its method and dataset
            (``"lr=1e-05"``), empty when it is the only one.
        runs: its runs, ordered by seed then folder.
        off_recipe: its departures from the method's published recipe (:func:`off_recipe`); when there are any,
            the published numbers are not its reference.
    """

    method: str
    dataset: str
    label: str
    runs: list[Run]
    off_recipe: list[str]

    @property
    def selection_split(self) -> str:
        return self.runs[0].selection_split


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _describe_split(method: str, dataset: str, parts: list[list[Run]]) -> tuple[list[str], str]:
    """Labels of ``parts`` (runs with equal settings) and one sentence saying which settings differ.

    A label lists the differing settings (``"lr=1e-05"``); with more than three, the groups are numbered instead
    (``"settings 2"``) and the sentence gives the values in group order.
    """
    keys = sorted({k for part in parts for k in part[0].settings})
    differing = [k for k in keys if len({_shown(p[0].settings.get(k, _ABSENT)) for p in parts}) > 1]
    reasons = ", ".join(f"{k} ({' vs '.join(_shown(p[0].settings.get(k, _ABSENT)) for p in parts)})"
                        for k in differing)
    if len(differing) <= 3:
        labels = [", ".join(f"{k}={_shown(p[0].settings.get(k, _ABSENT))}" for k in differing) for p in parts]
        order = ""
    else:
        numbers = [str(i) for i in range(1, len(parts) + 1)]
        labels = [f"settings {number}" for number in numbers]
        order = f" (values of settings {', '.join(numbers)} in that order)"
    return labels, (f"{len(parts)} groups of {method} on {dataset} differ in {reasons}{order}; they are not "
                    f"averaged together")


def group_runs(runs: Iterable[Run]) -> tuple[list[Group], list[str]]:
    """Runs split into groups that may be averaged, and notes for the reader.

    Runs of one method and dataset whose settings (``configs.yaml`` without :data:`MAY_DIFFER`, plus the selection
    split) are not all equal form several groups; a note names the settings that differ. Other notes: a seed that
    occurs twice in a group (the runs are not independent seeds), different code versions within a group, and a
    group with published numbers for its method and dataset that departs from the published recipe.
    """
    by_pair: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        parts = by_pair.setdefault((run.method, run.dataset), {})
        parts.setdefault(_settings_key(run.settings), []).append(run)
    groups, notes = [], []
    for (method, dataset), parts in sorted(by_pair.items()):
        ordered = [sorted(p, key=lambda r: (r.seed, r.folder)) for p in parts.values()]
        ordered.sort(key=lambda p: min(r.folder for r in p))  # run folders start with their time: oldest first
        labels = [""]
        if len(ordered) > 1:
            labels, note = _describe_split(method, dataset, ordered)
            notes.append(note)
        for label, part in zip(labels, ordered):
            group = Group(method, dataset, label, part, off_recipe(method, part[0].settings))
            groups.append(group)
            name = f"{method} on {dataset}" + (f" ({label})" if label else "")
            if group.off_recipe and any(key[:2] == (method, dataset) for key in PAPER):
                notes.append(f"{name}: no paper row, the published numbers are for another recipe "
                             f"({', '.join(group.off_recipe)})")
            seeds = [r.seed for r in part]
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            if twice:
                notes.append(f"{name}: seed {', '.join(map(str, twice))} occurs in several runs, which are "
                             f"averaged as if independent")
            versions = sorted({r.code_version for r in part})
            if len(versions) > 1:
                notes.append(f"{name}: runs come from different code versions ({', '.join(versions)})")
    return groups, notes


# ------------------------------------------------------------------------------------------------ table rows

@dataclass
class Row:
    """One line of the table: a group's runs at one query language and evaluation stage.

    Attributes:
        group: the runs.
        language: query language code, or None for a single-language dataset.
        stage: evaluation stage (``final``, or ``stage1`` for a two-stage method's first stage).
        values: ``{metric: [value of each run, in group order]}``, percent.
        marked: the checkpoint was chosen on the test split (``best`` selected on ``test``).
        paper: the published numbers to compare with, or None.
    """

    group: Group
    language: str | None
    stage: str
    values: dict[str, list[float]]
    marked: bool
    paper: dict[str, float | None] | None

    @property
    def n(self) -> int:
        return len(self.group.runs)

    def stats(self, metric: str) -> tuple[float, float | None]:
        return mean_std(self.values[metric])

    def difference(self, metric: str) -> float | None:
        """Mean − paper, or None where the paper gives no number."""
        reference = self.paper.get(metric) if self.paper else None
        return None if reference is None else self.stats(metric)[0] - reference


def _stage_order(stage: str) -> tuple[int, str]:
    return (1, stage) if stage == "final" else (0, stage)


def summarize(groups: Sequence[Group], checkpoint: str = "best", task: str = "t2i") -> list[Row]:
    """Table rows of ``groups`` for one checkpoint and task; a run that lacks a row its group needs is an error."""
    rows = []
    for group in groups:
        picked_by_run = []
        for run in group.runs:
            picked = {(m["language"], m["stage"]): m for m in run.metrics
                      if m["checkpoint"] == checkpoint and m["task"] == task}
            if not picked:
                have = sorted({f"{m['checkpoint']}/{m['task']}" for m in run.metrics})
                raise UserError(f"{os.path.join(run.folder, RESULTS_NAME)} has no metrics for checkpoint "
                                f"'{checkpoint}' and task '{task}' (it has {', '.join(have)}); choose them with "
                                f"--checkpoint and --task")
            picked_by_run.append((run, picked))
        keys = list(dict.fromkeys(key for _, picked in picked_by_run for key in picked))
        languages = list(dict.fromkeys(language for language, _ in keys))  # as the runs list them: source first
        for language, stage in sorted(keys, key=lambda key: (languages.index(key[0]), _stage_order(key[1]))):
            lacking = next((run for run, picked in picked_by_run if (language, stage) not in picked), None)
            if lacking:
                raise UserError(f"{os.path.join(lacking.folder, RESULTS_NAME)} has no metrics for checkpoint "
                                f"'{checkpoint}', language {language or 'null'}, stage {stage}, task '{task}', "
                                f"which the other runs of {group.method} on {group.dataset} have")
            found = [picked[(language, stage)] for _, picked in picked_by_run]
            published = stage == "final" and task == "t2i" and not group.off_recipe
            paper = paper_numbers(group.method, group.dataset, language) if published else None
            rows.append(Row(group=group, language=language, stage=stage,
                            values={k: [m[k] for m in found] for k in METRICS},
                            marked=checkpoint == "best" and group.selection_split == "test", paper=paper))
    return rows


# ----------------------------------------------------------------------------------------------- formatting

DASH = "\u2013"  # –


def _num(value: float | None, signed: bool = False) -> str:
    """Two decimals (with a sign for differences); None is a dash."""
    if value is None:
        return DASH
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cells(row: Row, plus_minus: str) -> tuple[list[str], list[str]]:
    """Mean ± std cells, and the reference cells ``paper (mean − paper)`` (empty when there is no paper row)."""
    shown, reference = [], []
    for metric in METRICS:
        mean, std = row.stats(metric)
        shown.append(_num(mean) + ("" if std is None else f" {plus_minus} {_num(std)}"))
        if row.paper:
            paper = row.paper.get(metric)
            reference.append(DASH if paper is None else f"{_num(paper)} ({_num(row.difference(metric), True)})")
    return shown, reference


def _describe(row: Row) -> list[str]:
    """Method (with the settings that set its group apart), dataset, language, stage, selection split and n."""
    method = row.group.method + (f" ({row.group.label})" if row.group.label else "")
    return [method, row.group.dataset, row.language or DASH, row.stage, row.group.selection_split,
            f"{row.n}" + (" (no std)" if row.n == 1 else "")]


def _heading(checkpoint: str, task: str) -> str:
    return (f"{TASKS[task]} retrieval ({task}), checkpoint '{checkpoint}': mean \u00b1 std over n runs (seeds); "
            f"std is the sample standard deviation (n \u2212 1 in the denominator), and a single run has none "
            f"(no std)." + (" These are the last epoch's weights, chosen on no split; the selection column says how "
                            "best.pth was chosen." if checkpoint == "last" else ""))


def _footnotes(rows: Sequence[Row]) -> list[tuple[bool, str]]:
    """The footnotes the rows need, as (starts with the test mark, text)."""
    notes = []
    if any(r.paper for r in rows):
        notes.append((False, f"paper: the published numbers, with mean \u2212 paper in brackets; {DASH} = not "
                             f"reported."))
    if any(r.marked for r in rows):
        notes.append((True, f" {TEST_NOTE}."))
    return notes


HEADER = ("method", "dataset", "language", "stage", "selection", "n") + METRICS


def format_markdown(rows: Sequence[Row], notes: Sequence[str], checkpoint: str = "best", task: str = "t2i") -> str:
    """A Markdown table with a reference row under each row that has published numbers, then footnotes and notes."""
    lines = [_heading(checkpoint, task), "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * 5 + "---:|" * (len(HEADER) - 5)]
    for row in rows:
        described, (shown, reference) = _describe(row), _cells(row, "\u00b1")
        if row.marked:
            described[4] += TEST_MARK
        lines.append("| " + " | ".join(described + shown) + " |")
        if reference:
            lines.append("| paper | | | | | | " + " | ".join(reference) + " |")
    footer = [(TEST_MARK if marked else "") + text for marked, text in _footnotes(rows)]
    footer += [f"Note: {note}." for note in notes]
    return "\n".join(lines + ([""] + footer if footer else [])) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  DASH: "--", "\u2026": r"\ldots{}", "\u00b1": r"$\pm$", "\u2212": "$-$"}
_LATEX_MARK = r"$^\dagger$"


def _tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and ±, −, –, … as LaTeX writes them."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def format_latex(rows: Sequence[Row], notes: Sequence[str], checkpoint: str = "best", task: str = "t2i") -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); footnotes after it, notes as ``%`` comments."""
    lines = [f"% {_heading(checkpoint, task)}", r"\begin{tabular}{lllll" + "r" * (len(HEADER) - 5) + "}",
             r"\toprule", " & ".join(HEADER) + r" \\", r"\midrule"]
    for row in rows:
        described, (shown, reference) = _describe(row), _cells(row, "\u00b1")
        cells = [_tex(c) for c in described + shown]
        if row.marked:
            cells[4] += _LATEX_MARK
        lines.append(" & ".join(cells) + r" \\")
        if reference:
            lines.append(r"\quad paper & & & & & & " + " & ".join(_tex(c) for c in reference) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    footer = [(_LATEX_MARK if marked else "") + _tex(text) for marked, text in _footnotes(rows)]
    if footer:
        lines.append(r"\par{\footnotesize " + r" \\ ".join(footer) + "}")
    lines += [f"% Note: {note}." for note in notes]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row], checkpoint: str = "best", task: str = "t2i") -> str:
    """One CSV line per row: description, seeds, and mean, std (empty for one run), paper and difference per metric."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ["method", "dataset", "settings", "language", "stage", "checkpoint", "task", "selection_split",
               "chosen_on_test", "n", "seeds"]
    for metric in METRICS:
        columns += [f"{metric}_mean", f"{metric}_std", f"{metric}_paper", f"{metric}_diff"]
    writer.writerow(columns)
    for row in rows:
        line = [row.group.method, row.group.dataset, row.group.label, row.language or "", row.stage, checkpoint, task,
                row.group.selection_split, int(row.marked), row.n, ";".join(str(r.seed) for r in row.group.runs)]
        for metric in METRICS:
            mean, std = row.stats(metric)
            paper = row.paper.get(metric) if row.paper else None
            diff = row.difference(metric)
            line += [f"{mean:.4f}", "" if std is None else f"{std:.4f}",
                     "" if paper is None else f"{paper:.2f}", "" if diff is None else f"{diff:.4f}"]
        writer.writerow(line)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------- plot

def _row_title(row: Row) -> str:
    parts = [row.group.method, row.group.dataset] + ([row.language] if row.language else []) + [row.stage]
    lines = [" \u00b7 ".join(parts) + f" (n={row.n})"] + ([row.group.label] if row.group.label else [])
    return "\n".join(lines + ([f"{TEST_MARK} chosen on test"] if row.marked else []))


def _plot_metric(ax, row: Row, metric: str) -> None:
    """One metric of one row: each run (dot, seed beside it), mean ± std (bar), the paper (dashed line or a note)."""
    values = row.values[metric]
    mean, std = row.stats(metric)
    offsets = [0.0] if len(values) == 1 else [0.5 * (i / (len(values) - 1) - 0.5) for i in range(len(values))]
    ax.scatter(offsets, values, s=26, color="#1f77b4", alpha=0.8, zorder=3)
    if len(values) <= 6:
        for x, y, run in zip(offsets, values, row.group.runs):
            ax.annotate(f"s{run.seed}", (x, y), textcoords="offset points", xytext=(4, 2), fontsize=7, color="#555555")
    ax.errorbar([0.6], [mean], yerr=None if std is None else [[std], [std]], fmt="_", markersize=16, color="black",
                capsize=5, elinewidth=1.5, zorder=4)
    spread = max(max(values) - min(values), 2 * (std or 0.0), 1.0)
    low, high = min(values) - 0.4 * spread, max(values) + 0.4 * spread
    paper = row.paper.get(metric) if row.paper else None
    if paper is not None and low <= paper <= high:
        ax.axhline(paper, color="#d62728", linestyle="--", linewidth=1.2, zorder=2)
    elif paper is not None:
        ax.text(0.5, 0.97 if paper > high else 0.03, f"paper {paper:.2f} {'above' if paper > high else 'below'}",
                transform=ax.transAxes, ha="center", va="top" if paper > high else "bottom", fontsize=8,
                color="#d62728")
    ax.set_ylim(low, high)
    ax.set_xlim(-0.5, 0.9)
    ax.set_xticks([])
    ax.set_title(f"{metric}: {_num(mean)}" + ("" if std is None else f" \u00b1 {_num(std)}"), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)


def plot_spread(rows: Sequence[Row], out_path: str) -> tuple[int, int]:
    """One line of panels per table row, one panel per metric with its own scale: each run's value (dots, with its
    seed), the mean ± std (black bar) and the published number (red dashed line); returns the size in pixels."""
    # matplotlib takes about a second to import: tables without --plot do not pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    dpi, size = 100, (2.4 * len(METRICS) + 1.6, 2.6 * len(rows) + 0.6)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(METRICS), squeeze=False)
    for line, row in zip(axes, rows):
        for ax, metric in zip(line, METRICS):
            _plot_metric(ax, row, metric)
        line[0].set_ylabel(_row_title(row) + "\n%", fontsize=9)
    legend = [Line2D([], [], marker="o", linestyle="", color="#1f77b4", label="one run (seed)"),
              Line2D([], [], marker="_", markersize=12, color="black", label="mean \u00b1 sample std"),
              Line2D([], [], linestyle="--", color="#d62728", label="paper")]
    fig.legend(handles=legend, loc="outside upper center", ncols=3, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=dpi, format="png", facecolor="white")
    return round(size[0] * dpi), round(size[1] * dpi)


# ------------------------------------------------------------------------------------------------ entry point

def collect(paths: Sequence[str], checkpoint: str = "best", task: str = "t2i") -> tuple[list[Row], list[str]]:
    """Find, read, group and summarise the runs below ``paths``: the table rows and the notes."""
    groups, notes = group_runs(load_run(folder) for folder in find_runs(paths))
    return summarize(groups, checkpoint, task), notes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Table of mean \u00b1 std over seeds of the runs below the given "
                                            "folders (each run folder holds results.json and configs.yaml), "
                                            "beside the published numbers.")
    p.add_argument("paths", nargs="+", help="run folders, or folders searched for them (e.g. logs/CUHK-PEDES)")
    p.add_argument("--format", default="markdown", choices=FORMATS, help="table format (default markdown)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="the selected checkpoint (best) or the last epoch (last)")
    p.add_argument("--task", default="t2i", choices=tuple(TASKS), help="text-to-image (t2i) or image-to-text")
    p.add_argument("--plot", default="", metavar="FILE.png", help="also draw each row's spread across seeds")
    cli = p.parse_args(argv)
    check_picture_path(cli.plot, "--plot")
    return cli


def run(cli: argparse.Namespace) -> str:
    rows, notes = collect(cli.paths, cli.checkpoint, cli.task)
    if cli.format == "csv":
        text = format_csv(rows, cli.checkpoint, cli.task)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    elif cli.format == "latex":
        text = format_latex(rows, notes, cli.checkpoint, cli.task)
    else:
        text = format_markdown(rows, notes, cli.checkpoint, cli.task)
    sys.stdout.write(text)
    if cli.plot:
        plot_spread(rows, cli.plot)
        print(f"plot: {cli.plot}", file=sys.stderr)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())

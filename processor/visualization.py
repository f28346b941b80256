"""Pictures of ranked gallery images, drawn with matplotlib's Agg canvas (no display, no global backend).

:func:`draw_ranking` lays out a wrapped title over one row of image tiles, split into labelled groups
(e.g. "top 10" and "same identity, ranked lower"). Tiles show the original image files, each under a
coloured frame (same identity / other identity, or neutral) and above a short label (rank, score, id).
Sizes are fixed in inches at :data:`DPI`, so a picture's pixel size depends only on its contents' count
(:func:`ranking_size`), never on the images.
"""
from __future__ import annotations

import logging
import os
import textwrap
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from datasets import read_image
from utils.errors import UserError

logger = logging.getLogger(__name__)

DPI = 100
SAME_COLOUR = "#1a9641"   # green frame: the image shows the query's person
OTHER_COLOUR = "#d7191c"  # red frame: another person
PLAIN_COLOUR = "#9a9a9a"  # thin grey frame: no ground truth (free-text search)

# Layout, in inches (and points for fonts).
_MARGIN = 0.3
_CELL_W, _CELL_H = 1.05, 2.8  # pedestrian crops are about 1:2.5 to 1:3
_TILE_GAP = 0.15
_GROUP_GAP = 0.55
_LABEL_H = 0.5
_HEADING_H = 0.35
_MIN_WIDTH = 7.0
_TITLE_PT, _SUBTITLE_PT, _HEADING_PT, _LABEL_PT = 14, 11, 11, 10
_LINE_SPACING = 1.35
# Average glyph width of DejaVu Sans as a fraction of the font size (regular, bold): used to wrap text.
_CHAR_WIDTH, _BOLD_CHAR_WIDTH = 0.53, 0.6


@dataclass(frozen=True)
class Tile:
    """One gallery image in a picture: its file, the text under it and its frame colour."""

    path: str
    label: str
    colour: str = PLAIN_COLOUR
    framed: bool = False  # a thick frame (ground truth known) rather than a thin outline


@dataclass(frozen=True)
class TileGroup:
    """Tiles shown side by side under one heading."""

    heading: str
    tiles: Sequence[Tile]


def check_picture_path(out: str, flag: str = "--out") -> None:
    """Pictures are PNG files: refuse another extension before any work is done (empty = the default)."""
    if out and os.path.splitext(out)[1].lower() != ".png":
        raise UserError(f"{flag} {out} must name a .png file")


def _text_width(text: str, points: float) -> float:
    """Approximate width in inches of one line of regular ``text`` at ``points``."""
    return len(text) * points * _CHAR_WIDTH / 72


def is_full_width(char: str) -> bool:
    """Full-width characters (Chinese, Japanese, Korean) take about twice the width of an average Latin letter."""
    return unicodedata.east_asian_width(char) in ("W", "F")


def _wrap_wide(paragraph: str, units: int) -> list[str]:
    """Greedy wrap of text with full-width characters (2 units) and others (1 unit); Chinese has no spaces to
    break at, so any character may end a line."""
    lines, line, used = [], "", 0
    for char in paragraph:
        cost = 2 if is_full_width(char) else 1
        if used + cost > units and line:
            lines.append(line.rstrip())
            line, used = ("" if char == " " else char), (0 if char == " " else cost)
        else:
            line, used = line + char, used + cost
    return lines + [line.rstrip()]


def _wrap(text: str, width_in: float, points: float, char_width: float = _CHAR_WIDTH) -> list[str]:
    """``text`` broken into lines that fit ``width_in`` inches; explicit newlines are kept."""
    chars = max(20, int(width_in * 72 / (points * char_width)))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        if any(is_full_width(char) for char in paragraph):
            lines.extend(_wrap_wide(paragraph, chars))
        else:
            lines.extend(textwrap.wrap(paragraph, chars, break_long_words=True) or [""])
    return lines


def _group_width(group: TileGroup) -> float:
    n = len(group.tiles)
    tiles = n * _CELL_W + max(n - 1, 0) * _TILE_GAP
    return max(tiles, _text_width(group.heading, _HEADING_PT))


def _text_height(lines: int, points: float) -> float:
    return lines * points * _LINE_SPACING / 72


@dataclass(frozen=True)
class _Layout:
    width: float
    height: float
    title: list[str]
    subtitle: list[str]


def _layout(title: str, subtitle: str, groups: Sequence[TileGroup]) -> _Layout:
    content = sum(_group_width(g) for g in groups) + _GROUP_GAP * max(len(groups) - 1, 0)
    width = max(_MIN_WIDTH, content + 2 * _MARGIN)
    title_lines = _wrap(title, width - 2 * _MARGIN, _TITLE_PT, _BOLD_CHAR_WIDTH)
    subtitle_lines = _wrap(subtitle, width - 2 * _MARGIN, _SUBTITLE_PT) if subtitle else []
    height = (2 * _MARGIN + _text_height(len(title_lines), _TITLE_PT) + _text_height(len(subtitle_lines), _SUBTITLE_PT)
              + 0.15 + _HEADING_H + _CELL_H + _LABEL_H)
    return _Layout(width, height, title_lines, subtitle_lines)


def ranking_size(title: str, groups: Sequence[TileGroup], subtitle: str = "") -> tuple[int, int]:
    """``(width, height)`` in pixels of the picture :func:`draw_ranking` makes from these arguments."""
    layout = _layout(title, subtitle, [g for g in groups if g.tiles])
    return round(layout.width * DPI), round(layout.height * DPI)


def _draw_tile(fig, tile: Tile, box: tuple[float, float, float, float], label_y: float, font: dict) -> None:
    """Image of ``tile`` in ``box`` (figure fractions, bottom-anchored, aspect kept), label centred under it."""
    ax = fig.add_axes(box)
    ax.imshow(np.asarray(read_image(tile.path)), interpolation="antialiased")
    ax.set_anchor("S")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(tile.colour)
        spine.set_linewidth(5 if tile.framed else 1)
    fig.text(box[0] + box[2] / 2, label_y, tile.label, ha="center", va="top", fontsize=_LABEL_PT,
             linespacing=1.2, **font)


def draw_ranking(out_path: str, title: str, groups: Sequence[TileGroup], subtitle: str = "") -> tuple[int, int]:
    """Write a PNG: ``title`` (and a smaller grey ``subtitle``), wrapped, above the groups' tiles in one row.

    Args:
        out_path: the PNG file to write (parent folders are created).
        title: main text, e.g. the query; wrapped to the picture's width.
        groups: the tile groups, left to right; groups without tiles are skipped.
        subtitle: a second, smaller line of information (optional).

    Returns:
        ``(width, height)`` of the picture in pixels, as :func:`ranking_size` says.

    Raises:
        UserError: an image file is missing or unreadable.
    """
    # matplotlib takes about a second to import: only the tools that draw pay for it (utils.fonts uses it too).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from utils.fonts import cjk_font_family  # imports matplotlib: deferred with it

    groups = [g for g in groups if g.tiles]
    texts = [title, subtitle] + [g.heading for g in groups] + [t.label for g in groups for t in g.tiles]
    # Chinese text needs a CJK font (one warning naming the package to install when there is none).
    font = {"fontfamily": cjk_font_family()} if any(is_full_width(c) for text in texts for c in text) else {}
    layout = _layout(title, subtitle, groups)
    size = ranking_size(title, groups, subtitle)
    w, h = size[0] / DPI, size[1] / DPI
    # Agg truncates the figure's size in pixels: half a pixel more makes it land exactly on ``size``.
    fig = Figure(figsize=((size[0] + 0.5) / DPI, (size[1] + 0.5) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")

    y = h - _MARGIN  # inches from the bottom, moving down
    fig.text(_MARGIN / w, y / h, "\n".join(layout.title), ha="left", va="top", fontsize=_TITLE_PT,
             fontweight="bold", linespacing=_LINE_SPACING, **font)
    y -= _text_height(len(layout.title), _TITLE_PT)
    if layout.subtitle:
        fig.text(_MARGIN / w, y / h, "\n".join(layout.subtitle), ha="left", va="top", fontsize=_SUBTITLE_PT,
                 color="#444444", linespacing=_LINE_SPACING, **font)
        y -= _text_height(len(layout.subtitle), _SUBTITLE_PT)
    y -= 0.15
    heading_y = y
    cell_bottom = y - _HEADING_H - _CELL_H
    x = _MARGIN
    for group in groups:
        fig.text(x / w, heading_y / h, group.heading, ha="left", va="top", fontsize=_HEADING_PT, color="#222222",
                 **font)
        for i, tile in enumerate(group.tiles):
            left = x + i * (_CELL_W + _TILE_GAP)
            _draw_tile(fig, tile, (left / w, cell_bottom / h, _CELL_W / w, _CELL_H / h), (cell_bottom - 0.06) / h,
                       font)
        x += _group_width(group) + _GROUP_GAP

    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with warnings.catch_warnings():  # without a CJK font cjk_font_family already said what to install, once
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(out_path, dpi=DPI, format="png", facecolor="white")
    logger.info("Wrote %s (%d x %d pixels)", out_path, *size)
    return size


def quote(text: str) -> str:
    """``text`` in typographic double quotes (a query or caption as a picture's title)."""
    return f"\u201c{text}\u201d"


def score_label(rank: int, score: float, pid: int, mark: str = "") -> str:
    """The two-line text under a tile: ``#rank  score`` and ``id pid`` (plus a mark such as ✓ / ✗)."""
    return f"#{rank}  {score:.3f}\nid {pid}{(' ' + mark) if mark else ''}"

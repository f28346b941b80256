"""A font that draws Chinese (CJK) text in matplotlib pictures.

matplotlib's default font (DejaVu Sans) has no Chinese glyphs: Chinese queries and captions come out as empty
boxes with "Glyph ... missing" warnings. :func:`cjk_font_family` returns a font family list to pass to
matplotlib text (``fontfamily=...``, or ``rcParams["font.family"]``) that starts with an installed CJK font, so
Chinese and Latin text both render; when no CJK font is installed it returns the fallback and logs one warning
naming the package to install (Debian/Ubuntu: ``fonts-noto-cjk``).

Fonts are looked up in matplotlib's font list (by family name) and, where fontconfig is installed, with
``fc-list :lang=zh`` — which also finds fonts installed after matplotlib built its font cache; such a font is
registered with matplotlib. A candidate counts only if it has a glyph for a common Chinese character.
"""
from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from matplotlib import font_manager, ft2font

logger = logging.getLogger(__name__)

#: Debian/Ubuntu package with the Noto Sans CJK fonts.
CJK_FONT_PACKAGE = "fonts-noto-cjk"

#: Families tried first, in this order (simplified Chinese variants before the others).
PREFERRED_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "Noto Sans CJK TC",
    "Noto Sans CJK HK", "Noto Sans CJK JP", "Noto Sans CJK KR", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
    "Microsoft YaHei", "PingFang SC", "Heiti SC", "SimHei", "Noto Serif CJK SC", "Source Han Serif SC",
    "AR PL UMing CN", "AR PL UKai CN", "Droid Sans Fallback", "Arial Unicode MS",
)
_CJK_NAME = re.compile(r"CJK|Han Sans|Han Serif|WenQuanYi|YaHei|PingFang|Hei|Song|Ming|Kai|Fallback|Noto Sans SC")
#: A character every Chinese font has (人, "person").
_PROBE = ord("\u4eba")
_CJK_TEXT = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]")

_warned = False


@dataclass(frozen=True)
class CjkFont:
    """An installed font with Chinese glyphs: its matplotlib family name and its file."""

    family: str
    path: str


def has_cjk(text: str) -> bool:
    """Whether ``text`` has Chinese, Japanese or Korean characters (or full-width punctuation)."""
    return bool(_CJK_TEXT.search(text))


def covers_cjk(path: str) -> bool:
    """Whether the font file at ``path`` has a glyph for a common Chinese character (False if unreadable)."""
    try:
        return ft2font.FT2Font(path).get_char_index(_PROBE) != 0
    except (OSError, RuntimeError, ValueError):
        return False


def _matplotlib_fonts() -> list[tuple[str, str]]:
    """``(family, file)`` of the fonts matplotlib knows whose family name looks like a CJK font."""
    entries = [e for e in font_manager.fontManager.ttflist if _CJK_NAME.search(e.name)]
    entries.sort(key=lambda e: (e.style != "normal", abs(_weight(e.weight) - 400)))  # regular faces first
    return [(entry.name, entry.fname) for entry in entries]


def _weight(value) -> int:
    """matplotlib's font weight as a number (it may be stored as a name such as 'bold')."""
    return value if isinstance(value, int) else font_manager.weight_dict.get(str(value), 400)


def _fontconfig_fonts() -> list[tuple[str, str]]:
    """``(family, file)`` of the fonts fontconfig lists for Chinese (empty without ``fc-list``)."""
    if shutil.which("fc-list") is None:
        return []
    try:
        listing = subprocess.run(["fc-list", ":lang=zh", "-f", "%{family[0]}\t%{style[0]}\t%{file}\n"],
                                 capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split("\t") for line in listing.splitlines() if line.count("\t") == 2]
    rows.sort(key=lambda row: row[1] != "Regular")  # regular faces first
    return [(family, path) for family, _, path in rows]


def _rank(family: str) -> int:
    return PREFERRED_FAMILIES.index(family) if family in PREFERRED_FAMILIES else len(PREFERRED_FAMILIES)


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> Optional[CjkFont]:
    """The installed font to draw Chinese with (preferred families first), or ``None``; the answer is cached."""
    known = _matplotlib_fonts()
    candidates = sorted(known + _fontconfig_fonts(), key=lambda item: _rank(item[0]))  # stable: matplotlib's first
    known_files = {path for _, path in known}
    for family, path in candidates:
        if not covers_cjk(path):
            continue
        if path not in known_files:  # installed after matplotlib built its cache
            font_manager.fontManager.addfont(path)
            if family not in {entry.name for entry in font_manager.fontManager.ttflist}:
                family = font_manager.FontProperties(fname=path).get_name()
        return CjkFont(family=family, path=path)
    return None


def cjk_font_family(fallback: Sequence[str] = ("DejaVu Sans",)) -> list[str]:
    """Font families for matplotlib text that may hold Chinese: ``[<CJK family>, *fallback]``.

    Without an installed CJK font: ``list(fallback)``, and one warning (per process) saying what to install.
    """
    global _warned
    font = find_cjk_font()
    if font is not None:
        return [font.family, *fallback]
    if not _warned:
        _warned = True
        logger.warning("No font with Chinese glyphs is installed, so Chinese text in pictures will show as empty "
                       "boxes; install one (Debian/Ubuntu: apt-get install %s; elsewhere any Noto Sans CJK font).",
                       CJK_FONT_PACKAGE)
    return list(fallback)

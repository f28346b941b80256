"""Finding a font with Chinese glyphs for pictures, and the one-time warning without one."""
import logging
import shutil
import subprocess

import pytest
from matplotlib import font_manager

import utils.fonts as fonts


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch):
    fonts.find_cjk_font.cache_clear()
    monkeypatch.setattr(fonts, "_warned", False)
    yield
    fonts.find_cjk_font.cache_clear()


def test_has_cjk():
    assert fonts.has_cjk("一名男子") and fonts.has_cjk("a man，") and not fonts.has_cjk("a man, tall.")


def test_default_font_has_no_chinese_glyphs():
    dejavu = font_manager.findfont("DejaVu Sans")
    assert not fonts.covers_cjk(dejavu)
    assert not fonts.covers_cjk("/no/such/font.ttf")


def test_without_a_cjk_font_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(fonts, "_matplotlib_fonts", lambda: [])
    monkeypatch.setattr(fonts, "_fontconfig_fonts", lambda: [])
    with caplog.at_level(logging.WARNING, logger="utils.fonts"):
        assert fonts.cjk_font_family() == ["DejaVu Sans"]
        assert fonts.cjk_font_family(("Arial",)) == ["Arial"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "utils.fonts"]
    assert len(warnings) == 1 and "apt-get install fonts-noto-cjk" in warnings[0]


def test_preferred_family_wins_and_glyphs_are_checked(monkeypatch):
    known = [("Some Hei", "/f/hei.ttf"), ("Noto Sans CJK JP", "/f/jp.otf")]
    monkeypatch.setattr(fonts, "_matplotlib_fonts", lambda: known)
    monkeypatch.setattr(fonts, "_fontconfig_fonts", lambda: [("Noto Sans CJK SC", "/f/sc-broken.otf")])
    monkeypatch.setattr(fonts, "covers_cjk", lambda path: "broken" not in path)
    assert fonts.find_cjk_font() == fonts.CjkFont("Noto Sans CJK JP", "/f/jp.otf")  # SC has no glyphs: skipped
    assert fonts.cjk_font_family() == ["Noto Sans CJK JP", "DejaVu Sans"]


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="fontconfig is not installed")
def test_an_installed_chinese_font_is_found():
    listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True).stdout.strip()
    if not listed:
        pytest.skip("no Chinese font is installed here (Debian: apt-get install fonts-noto-cjk)")
    font = fonts.find_cjk_font()
    assert font is not None and fonts.covers_cjk(font.path)
    assert font.family in {entry.name for entry in font_manager.fontManager.ttflist}

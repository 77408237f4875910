"""Chinese labels in apps/generate.py's sample grid: a CJK font found by path (Debian's
fonts-noto-cjk), else Pillow's default with one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import apps.generate as generate_app
from apps.generate import CJK_FONTS, grid_font, image_grid

HAS_CJK = any(Path(path).is_file() for path, _ in CJK_FONTS)
IMAGES = [Image.new("RGB", (16, 16), "red")]


def grid(label: str, font_path: str | None = None) -> np.ndarray:
    return np.asarray(image_grid(IMAGES, [label], font_path=font_path))


@pytest.mark.skipif(not HAS_CJK, reason="no CJK font installed (Debian: apt-get install fonts-noto-cjk; make system-deps)")
def test_chinese_labels_are_drawn_with_their_own_glyphs(caplog):
    with caplog.at_level(logging.WARNING):
        red, blue = grid("0: 一个红色的圆形"), grid("0: 一个蓝色的圆形")
    assert not caplog.records
    assert red.tobytes() != blue.tobytes()  # 红 and 蓝 are different glyphs, not the same box
    assert "CJK" in grid_font().getname()[0]


def test_without_a_cjk_font_each_grid_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(generate_app, "CJK_FONTS", (("/nonexistent/font.ttc", 0),))
    with caplog.at_level(logging.WARNING):
        red, blue = grid("0: 一个红色的圆形"), grid("0: 一个蓝色的圆形")
    assert red.tobytes() == blue.tobytes()  # Pillow's default font: every Chinese character is the same box
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "install fonts-noto-cjk" in warnings[0] and "grid_font=FILE" in warnings[0]


def test_a_bad_grid_font_names_the_option(tmp_path):
    (tmp_path / "font.ttf").write_text("not a font")
    with pytest.raises(ValueError, match=r"grid_font=.*font.ttf: not a readable TrueType font"):
        grid("0: a red circle", str(tmp_path / "font.ttf"))

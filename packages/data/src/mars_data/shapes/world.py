"""The bilingual shapes world: palette, shapes, scene sampler and renderer.

Everything here follows docs/SHAPES_WORLD.md exactly. Positions and sizes are fractions of
the canvas side, so a scene renders at any size; a non-square canvas scales x by the width and
y by the height (a circle on a 2:1 canvas is an ellipse twice as wide as high, as the world
defines it). The renderer rasterises by testing pixel centres against the exact geometry:
flat fill, no anti-aliasing, so every object pixel carries its exact palette colour and the
scorer can find objects by colour alone.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
COLORS_ZH: dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPES_ZH: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}

# "A is R B": A sits at 0.5 + 0.25 * (dx, dy), B mirrored at 0.5 - 0.25 * (dx, dy); y grows down.
RELATION_OFFSETS: dict[str, tuple[int, int]] = {
    "left of": (-1, 0),
    "right of": (1, 0),
    "above": (0, -1),
    "below": (0, 1),
}
RELATIONS: tuple[str, ...] = tuple(RELATION_OFFSETS)
RELATIONS_ZH: dict[str, str] = {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"}

SINGLE_CENTER_RANGE = (0.35, 0.65)
SINGLE_SIZE_RANGE = (0.30, 0.45)
PAIR_SIZE_RANGE = (0.25, 0.35)
PAIR_OFFSET = 0.25
# With sizes <= 0.35 the two objects of a pair are 0.15 apart; a jitter up to 0.05 per
# coordinate keeps them apart, inside the canvas and on the same side of each other.
MAX_JITTER = 0.05

_DECIMALS = 4  # scene records carry rounded numbers; the renderer draws exactly those


def sample_scene(rng: random.Random, num_objects: int | None = None, jitter: float = 0.0) -> dict:
    """A random scene: ``{"objects": [{"color", "shape", "cx", "cy", "s"}, ...], "relation"?}``.

    ``num_objects`` is 1 or 2 (None: either, with equal probability). ``jitter`` moves each
    coordinate of a two-object scene by up to that fraction of the canvas (at most
    ``MAX_JITTER``, so the relation keeps its meaning); 0 gives the world's exact layout.
    """
    if num_objects is None:
        num_objects = rng.choice((1, 2))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if not 0.0 <= jitter <= MAX_JITTER:
        raise ValueError(f"jitter must be in [0, {MAX_JITTER}], got {jitter}")

    def r(x: float) -> float:
        return round(x, _DECIMALS)

    if num_objects == 1:
        return {
            "objects": [
                {
                    "color": rng.choice(list(COLORS)),
                    "shape": rng.choice(SHAPES),
                    "cx": r(rng.uniform(*SINGLE_CENTER_RANGE)),
                    "cy": r(rng.uniform(*SINGLE_CENTER_RANGE)),
                    "s": r(rng.uniform(*SINGLE_SIZE_RANGE)),
                }
            ]
        }

    relation = rng.choice(RELATIONS)
    dx, dy = RELATION_OFFSETS[relation]
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    kind_a, kind_b = rng.sample(kinds, 2)
    objects = []
    for (color, shape), sign in ((kind_a, 1), (kind_b, -1)):
        objects.append(
            {
                "color": color,
                "shape": shape,
                "cx": r(0.5 + sign * PAIR_OFFSET * dx + rng.uniform(-jitter, jitter)),
                "cy": r(0.5 + sign * PAIR_OFFSET * dy + rng.uniform(-jitter, jitter)),
                "s": r(rng.uniform(*PAIR_SIZE_RANGE)),
            }
        )
    return {"objects": objects, "relation": relation}


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points in a shape's box, given box coordinates u, v in [0, 1] (v down).

    Shared by the renderer (box = the object's box) and the scorer (box = a found region's
    bounding box, to compare the region with each ideal shape).
    """
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up at (0.5, 0), base from (0, 1) to (1, 1)
        return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: dict, width: int = 64, height: int | None = None) -> Image.Image:
    """Draw a scene on a white RGB canvas of ``width`` x ``height`` pixels (square by default)."""
    height = width if height is None else height
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene["objects"]:
        canvas[object_masks(obj["shape"], *(np.array([obj[k]]) for k in ("cx", "cy", "s")), width, height)[0]] = COLORS[obj["color"]]
    return Image.fromarray(canvas)


def object_masks(shape: str, cx: np.ndarray, cy: np.ndarray, s: np.ndarray, width: int, height: int,
                 rows: np.ndarray | None = None, columns: np.ndarray | None = None) -> np.ndarray:
    """The pixels of a ``width`` x ``height`` canvas that n objects of one shape cover (box
    centres ``cx``, ``cy`` and sizes ``s``: arrays (n,)), as booleans (n, rows, columns):
    pixel centres tested against the exact geometry; ``rows``, ``columns``: the pixel indices
    to test (default: all)."""
    rows = np.arange(height) if rows is None else rows
    columns = np.arange(width) if columns is None else columns
    x = (columns + 0.5) / width  # pixel centres as fractions of the canvas
    y = (rows + 0.5) / height
    u = (x[None, None, :] - (cx - s / 2)[:, None, None]) / s[:, None, None]
    v = (y[None, :, None] - (cy - s / 2)[:, None, None]) / s[:, None, None]
    return shape_mask(shape, u, v)

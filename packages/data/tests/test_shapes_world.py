"""The world's definitions: palette, sampler ranges and layouts, exact flat rendering."""

import random

import numpy as np
import pytest

from mars_data.shapes import (
    COLORS,
    COLORS_ZH,
    RELATION_OFFSETS,
    RELATIONS_ZH,
    SHAPES,
    SHAPES_ZH,
    render,
    sample_scene,
)


def test_palette_and_names_follow_the_world():
    assert COLORS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (240, 200, 30),
        "purple": (140, 60, 180),
        "orange": (245, 130, 20),
    }
    assert COLORS_ZH["purple"] == "紫色" and SHAPES_ZH["square"] == "正方形"
    assert set(SHAPES) == set(SHAPES_ZH) == {"circle", "square", "triangle"}
    assert RELATIONS_ZH == {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"}


def test_one_object_scenes_stay_in_their_ranges():
    rng = random.Random(0)
    for _ in range(500):
        (obj,) = sample_scene(rng, 1)["objects"]
        assert 0.35 <= obj["cx"] <= 0.65 and 0.35 <= obj["cy"] <= 0.65
        assert 0.30 <= obj["s"] <= 0.45


def test_two_object_scenes_use_the_relation_layout_and_differ():
    rng = random.Random(0)
    relations = set()
    for _ in range(500):
        scene = sample_scene(rng, 2)
        a, b = scene["objects"]
        dx, dy = RELATION_OFFSETS[scene["relation"]]
        relations.add(scene["relation"])
        assert (a["cx"], a["cy"]) == (0.5 + 0.25 * dx, 0.5 + 0.25 * dy)
        assert (b["cx"], b["cy"]) == (0.5 - 0.25 * dx, 0.5 - 0.25 * dy)
        assert 0.25 <= a["s"] <= 0.35 and 0.25 <= b["s"] <= 0.35
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])
    assert relations == set(RELATION_OFFSETS)


def test_jitter_moves_pairs_a_little_and_is_bounded():
    rng = random.Random(1)
    scene = sample_scene(rng, 2, jitter=0.05)
    a, _ = scene["objects"]
    dx, dy = RELATION_OFFSETS[scene["relation"]]
    assert abs(a["cx"] - (0.5 + 0.25 * dx)) <= 0.05 and abs(a["cy"] - (0.5 + 0.25 * dy)) <= 0.05
    with pytest.raises(ValueError, match="jitter"):
        sample_scene(rng, 2, jitter=0.2)
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(rng, 3)


def test_sampling_is_reproducible():
    assert sample_scene(random.Random(7)) == sample_scene(random.Random(7))


@pytest.mark.parametrize("width,height", [(64, None), (32, None), (96, 64), (64, 128)])
def test_render_is_flat_palette_on_white_at_any_size(width, height):
    scene = {
        "objects": [
            {"color": "blue", "shape": "square", "cx": 0.25, "cy": 0.5, "s": 0.25},
            {"color": "orange", "shape": "triangle", "cx": 0.75, "cy": 0.5, "s": 0.25},
        ],
        "relation": "left of",
    }
    image = np.asarray(render(scene, width, height))
    height = height or width
    assert image.shape == (height, width, 3)
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    assert colors == {(255, 255, 255), COLORS["blue"], COLORS["orange"]}  # no anti-aliasing
    blue = (image == COLORS["blue"]).all(-1)
    assert blue.sum() == pytest.approx(0.25 * width * 0.25 * height, rel=0.15)
    assert tuple(image[height // 2, width // 4]) == COLORS["blue"]
    assert tuple(image[0, 0]) == (255, 255, 255)


def test_render_shapes_have_their_geometry():
    def pixels(shape):
        image = np.asarray(render({"objects": [{"color": "red", "shape": shape, "cx": 0.5, "cy": 0.5, "s": 0.5}]}, 200))
        return (image != 255).any(-1)

    square, circle, triangle = pixels("square"), pixels("circle"), pixels("triangle")
    assert square.sum() == 100 * 100
    assert circle.sum() == pytest.approx(np.pi / 4 * 100 * 100, rel=0.02)
    assert triangle.sum() == pytest.approx(0.5 * 100 * 100, rel=0.03)
    rows = triangle.sum(axis=1)
    assert rows[51] < rows[148]  # apex up: narrow at the top, wide at the base

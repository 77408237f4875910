"""The evaluator: perfect renders score 1, blank and noise 0, each kind of mistake is caught."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from mars_data.shapes import (
    METRICS,
    RELATION_OFFSETS,
    detect,
    ideal_upscale,
    render,
    sample_scene,
    score_image,
    summarize,
    write_caption,
    write_prompts,
)

PAIR = {
    "prompt": "a red circle left of one blue square",
    "lang": "en",
    "scene": {
        "objects": [
            {"color": "red", "shape": "circle", "cx": 0.25, "cy": 0.5, "s": 0.3},
            {"color": "blue", "shape": "square", "cx": 0.75, "cy": 0.5, "s": 0.3},
        ],
        "relation": "left of",
    },
}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", num=24, seed=0)


@pytest.mark.parametrize("width,height", [(32, 32), (64, 64), (256, 256), (96, 64), (64, 128), (128, 64)])
def test_renders_of_prompt_file_scenes_score_one_everywhere(prompts, width, height):
    results = [score_image(render(r["scene"], width, height), r) for r in prompts]
    summary = summarize(results)
    for group in ("en", "zh", "all"):
        assert all(summary[group][metric] == 1.0 for metric in METRICS), (group, summary[group])
    assert summary["all"]["count"] == 24 and summary["en"]["count"] == summary["zh"]["count"] == 12


@pytest.mark.parametrize("size", [32, 64, 256])
def test_blank_and_noise_images_score_zero(prompts, size):
    blank = np.full((size, size, 3), 255, dtype=np.uint8)
    noise = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    for image in (blank, noise):
        # the first four rows: one and two objects, in English and in Chinese
        summary = summarize([score_image(image, r) for r in prompts[:4]])
        assert all(summary["all"][metric] == 0.0 for metric in METRICS), summary["all"]


def test_regions_are_four_connected_and_follow_bends():
    from mars_data.shapes.scoring import label_regions

    classes = np.array(
        [
            [0, -1, 0, -1],
            [0, -1, 0, 1],
            [0, 0, 0, -1],
            [-1, -1, -1, 1],
        ]
    )
    labels = label_regions(classes)
    assert len(set(labels[classes == 0].tolist())) == 1  # the U is one region
    assert labels[1, 3] != labels[3, 3]  # touching diagonally is not touching
    assert (labels[classes < 0] == -1).all()


def test_missing_image_is_wrong_on_every_count(prompts):
    summary = summarize([score_image(None, r) for r in prompts])
    assert all(summary["all"][metric] == 0.0 for metric in METRICS)
    assert summary["all"]["missing"] == summary["all"]["count"] == len(prompts)


def test_an_extra_object_fails_binding():
    scene = {**PAIR["scene"], "objects": PAIR["scene"]["objects"] + [{"color": "green", "shape": "triangle", "cx": 0.5, "cy": 0.15, "s": 0.2}]}
    result = score_image(render(scene), PAIR)
    assert not result["binding"] and not result["spatial"] and not result["color"] and not result["shape"]
    single = {"prompt": "a red circle", "lang": "en", "scene": {"objects": [PAIR["scene"]["objects"][0]]}}
    assert score_image(render(single["scene"]), single)["binding"]
    assert not score_image(render(PAIR["scene"]), single)["binding"]


def test_swapped_colors_fail_binding_but_not_color_accuracy():
    a, b = PAIR["scene"]["objects"]
    swapped = {**PAIR["scene"], "objects": [{**a, "color": b["color"]}, {**b, "color": a["color"]}]}
    result = score_image(render(swapped), PAIR)
    assert not result["binding"] and not result["spatial"]
    assert result["color"] and result["shape"]  # the right colours and shapes, wrongly bound


def test_a_wrong_color_or_shape_fails_its_accuracy():
    a, b = PAIR["scene"]["objects"]
    recolored = score_image(render({**PAIR["scene"], "objects": [{**a, "color": "green"}, b]}), PAIR)
    reshaped = score_image(render({**PAIR["scene"], "objects": [{**a, "shape": "triangle"}, b]}), PAIR)
    assert not recolored["color"] and recolored["shape"] and not recolored["binding"]
    assert reshaped["color"] and not reshaped["shape"] and not reshaped["binding"]


@pytest.mark.parametrize("relation", list(RELATION_OFFSETS))
def test_a_mirrored_layout_fails_spatial_only(relation):
    rng = random.Random(relation)
    scene = sample_scene(rng, 2)
    a, b = scene["objects"]
    dx, dy = RELATION_OFFSETS[relation]
    here, there = {"cx": 0.5 + 0.25 * dx, "cy": 0.5 + 0.25 * dy}, {"cx": 0.5 - 0.25 * dx, "cy": 0.5 - 0.25 * dy}
    scene = {"objects": [{**a, **here}, {**b, **there}], "relation": relation}
    record = {"prompt": write_caption(scene, "zh", rng), "lang": "zh", "scene": scene}
    mirrored = {"objects": [{**a, **there}, {**b, **here}], "relation": relation}
    assert score_image(render(scene), record)["spatial"]
    result = score_image(render(mirrored), record)
    assert result["binding"] and result["color"] and result["shape"] and result["spatial"] is False


def test_a_horizontally_flipped_image_fails_spatial():
    image = np.asarray(render(PAIR["scene"], 64))
    assert score_image(image, PAIR)["spatial"]
    result = score_image(np.ascontiguousarray(image[:, ::-1]), PAIR)
    assert result["binding"] and not result["spatial"]


def test_objects_too_close_along_the_axis_fail_spatial():
    a, b = PAIR["scene"]["objects"]
    stacked = {**PAIR["scene"], "objects": [{**a, "cx": 0.45, "cy": 0.2}, {**b, "cx": 0.5, "cy": 0.75}]}
    result = score_image(render(stacked), PAIR)  # A is above B, hardly left of it
    assert result["binding"] and not result["spatial"]


def test_detection_tolerates_noise_and_jpeg():
    rng = np.random.default_rng(0)
    image = np.asarray(render(PAIR["scene"], 64)).astype(np.int16)
    noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    jpeg = Image.open(buffer)
    for degraded in (noisy, jpeg):
        result = score_image(degraded, PAIR)
        assert result["binding"] and result["spatial"], result["found"]


def test_detect_reports_centres_and_shapes():
    found = detect(render(PAIR["scene"], 128))
    assert sorted((f["color"], f["shape"]) for f in found) == [("blue", "square"), ("red", "circle")]
    red = next(f for f in found if f["color"] == "red")
    assert red["cx"] == pytest.approx(0.25, abs=0.01) and red["cy"] == pytest.approx(0.5, abs=0.01)


def test_a_prompt_without_a_scene_is_scored_from_its_parse():
    assert score_image(render(PAIR["scene"]), {"prompt": "一个红色的圆形在一个蓝色的正方形的左边"})["spatial"]
    assert score_image(render(PAIR["scene"]), {"prompt": "一个红色的圆形在一个蓝色的正方形的右边"})["spatial"] is False


def test_summary_per_language():
    results = [
        {"lang": "en", "num_objects": 1, "binding": True, "spatial": None, "color": True, "shape": True},
        {"lang": "en", "num_objects": 2, "binding": True, "spatial": False, "color": True, "shape": False},
        {"lang": "zh", "num_objects": 2, "binding": False, "spatial": False, "color": False, "shape": True},
    ]
    summary = summarize(results)
    assert summary["en"] == {"single_binding": 1.0, "pair_binding": 1.0, "spatial": 0.0, "color": 1.0, "shape": 0.5, "count": 2, "missing": 0}
    assert summary["zh"]["single_binding"] is None and summary["zh"]["pair_binding"] == 0.0
    assert summary["all"]["pair_binding"] == 0.5 and summary["all"]["count"] == 3


def test_ideal_upscale_beats_nearest_neighbour_on_slanted_edges_only():
    """The per-pixel best guess from a low-res render: at least as close to the exact high-res
    render as nearest-neighbour upscaling, and closer where edges are slanted or curved (a
    square's straight edges leave nothing to infer); the same seed gives the same image."""
    from mars_data.shapes.scoring import classify_pixels

    rng = random.Random(5)
    gained = {"circle": 0, "square": 0, "triangle": 0}
    for _ in range(18):
        scene = sample_scene(rng, num_objects=1)
        exact = classify_pixels(np.asarray(render(scene, 64, 48)))
        ideal = ideal_upscale(scene, (32, 24), (64, 48), seed=1)
        nearest = render(scene, 32, 24).resize((64, 48), Image.NEAREST)
        wrong = [int((classify_pixels(np.asarray(im)) != exact).sum()) for im in (ideal, nearest)]
        gained[scene["objects"][0]["shape"]] += wrong[1] - wrong[0]
        assert np.array_equal(np.asarray(ideal), np.asarray(ideal_upscale(scene, (32, 24), (64, 48), seed=1)))
    assert gained["circle"] > 10 and gained["triangle"] > 10 and abs(gained["square"]) <= 4, gained

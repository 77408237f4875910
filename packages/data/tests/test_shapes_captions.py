"""The prompt grammar: every form written, every caption parsed back, clear errors."""

import random
from collections import Counter

import pytest

from mars_data.shapes import FORMS, forms_for, parse_caption, sample_scene, shard_records, write_caption


def kinds(scene):
    """What a caption carries of a scene: colours, shapes and relation, not positions."""
    out = {"objects": [{"color": o["color"], "shape": o["shape"]} for o in scene["objects"]]}
    if "relation" in scene:
        out["relation"] = scene["relation"]
    return out


def test_every_form_of_every_caption_parses_back_to_its_scene():
    rng = random.Random(0)
    for _ in range(400):
        scene = sample_scene(rng)
        for lang in ("en", "zh"):
            for form in forms_for(lang, len(scene["objects"])):
                caption = write_caption(scene, lang, rng, form=form)
                parsed = parse_caption(caption)
                assert parsed == {"lang": lang, "form": form, "scene": kinds(scene)}, caption


@pytest.mark.parametrize(
    "prompt,lang,scene",
    [
        (
            "a yellow circle right of one yellow square",
            "en",
            {"objects": [{"color": "yellow", "shape": "circle"}, {"color": "yellow", "shape": "square"}], "relation": "right of"},
        ),
        ("an image of one purple triangle", "en", {"objects": [{"color": "purple", "shape": "triangle"}]}),
        (
            "一个紫色的正方形在一个红色的圆形的上面",
            "zh",
            {"objects": [{"color": "purple", "shape": "square"}, {"color": "red", "shape": "circle"}], "relation": "above"},
        ),
        ("白色背景上有一个蓝色的圆形", "zh", {"objects": [{"color": "blue", "shape": "circle"}]}),
        ("  A Orange  Square on a white background. ", "en", {"objects": [{"color": "orange", "shape": "square"}]}),
        ("there is an orange circle below one red triangle", "en", {"objects": [{"color": "orange", "shape": "circle"}, {"color": "red", "shape": "triangle"}], "relation": "below"}),
        ("一个橙色的三角形在一个绿色的三角形的左边。", "zh", {"objects": [{"color": "orange", "shape": "triangle"}, {"color": "green", "shape": "triangle"}], "relation": "left of"}),
    ],
)
def test_the_worlds_examples_parse(prompt, lang, scene):
    parsed = parse_caption(prompt)
    assert parsed["lang"] == lang and parsed["scene"] == scene


@pytest.mark.parametrize(
    "prompt,unknown",
    [
        ("a pink circle", "'pink'"),
        ("one red hexagon left of a blue square", "'hexagon'"),
        ("一个粉色的圆形", "'粉色'"),
        ("一个红色的圆形在一个蓝色的方块的左边", "'方块'"),
    ],
)
def test_unknown_words_are_named(prompt, unknown):
    with pytest.raises(ValueError, match="unknown words") as error:
        parse_caption(prompt)
    assert unknown in str(error.value)


@pytest.mark.parametrize("prompt", ["circle red a", "a red circle left of", "一个红色的圆形在"])
def test_known_words_out_of_grammar_are_rejected(prompt):
    with pytest.raises(ValueError, match="not a form"):
        parse_caption(prompt)


def test_two_identical_objects_are_not_a_scene():
    with pytest.raises(ValueError, match="identical"):
        parse_caption("a red circle left of one red circle")


def test_a_form_that_does_not_fit_the_scene_is_refused():
    scene = sample_scene(random.Random(0), 1)
    with pytest.raises(ValueError, match="does not fit"):
        write_caption(scene, "en", random.Random(0), form="en.pair")


def test_every_form_appears_in_a_10000_sample_shard_set_in_both_languages():
    """The records of 10 shards of 1000, exactly as the shard writer makes them (not rendered)."""
    forms, langs = Counter(), Counter()
    for shard in range(10):
        for record in shard_records(seed=0, shard=shard, count=1000):
            parsed = parse_caption(record["prompt"])
            assert parsed["lang"] == record["lang"]
            assert parsed["scene"] == kinds(record["scene"])
            forms[parsed["form"]] += 1
            langs[parsed["lang"]] += 1
    assert set(forms) == {form for lang in FORMS.values() for form in lang}
    assert min(forms.values()) > 500 and min(langs.values()) > 4500

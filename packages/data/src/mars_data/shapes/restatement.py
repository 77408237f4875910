"""The layout restatement: a scene in the image's reading order, in canonical English.

"a yellow circle right of one blue square" -> "blue square left of yellow circle";
"一个红色的圆形在一个绿色的三角形的下面" -> "green triangle above red circle"; one object:
"red circle". The left object comes first for a horizontal relation, the top one for a vertical
one.

Why it exists: MARS keeps the text LLM frozen, so the visual experts can only read what its
hidden states already hold. The shapes world's LLM is pretrained to continue every caption with
its restatement (``mars_app.lm_corpus``), so it must work out which object goes where; stage I
then uses the restatement as the plan the LLM writes before the image and as the captioning
target (the task plugin ``mars_data.shapes.task``). Restatements, captions of every grammar
form and the relation inverses are all judged here (``caption_correct``).
"""

from __future__ import annotations

from mars_data.shapes.captions import parse_caption
from mars_data.shapes.world import COLORS, SHAPES

# relation -> (the object read first is A, the canonical relation word)
CANONICAL = {"left of": (True, "left of"), "right of": (False, "left of"), "above": (True, "above"), "below": (False, "above")}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def restatement(scene: dict) -> str:
    """The scene in the image's reading order, in canonical English."""
    objects = [f"{o['color']} {o['shape']}" for o in scene["objects"]]
    if len(objects) == 1:
        return objects[0]
    a_first, word = CANONICAL[scene["relation"]]
    first, second = objects if a_first else objects[::-1]
    return f"{first} {word} {second}"


def restate_caption(caption: str) -> str:
    """The restatement of a caption of the world's grammar (either language)."""
    return restatement(parse_caption(caption)["scene"])


def parse_restatement(text: str) -> dict:
    """The scene of a restatement ("blue square left of yellow circle"); ValueError if it is none."""
    words = text.split()

    def thing(color: str, shape: str) -> dict:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"{text!r} is not a restatement")
        return {"color": color, "shape": shape}

    if len(words) == 2:
        return {"objects": [thing(*words)]}
    relation = " ".join(words[2:-2])
    if len(words) < 5 or relation not in {word for _, word in CANONICAL.values()}:
        raise ValueError(f"{text!r} is not a restatement")
    return {"objects": [thing(*words[:2]), thing(*words[-2:])], "relation": relation}


def caption_correct(caption: str, record: dict) -> bool:
    """A caption (either language, any grammar form, or a restatement) names the record's
    objects and relation: "A left of B" and "B right of A" both describe the same scene."""
    try:
        parsed = parse_caption(caption)["scene"]
    except ValueError:
        try:
            parsed = parse_restatement(caption)
        except ValueError:
            return False
    wanted = record["scene"]
    objects = [(o["color"], o["shape"]) for o in parsed["objects"]]
    target = [(o["color"], o["shape"]) for o in wanted["objects"]]
    if "relation" not in wanted:
        return objects == target and "relation" not in parsed
    return (objects, parsed.get("relation")) in ((target, wanted["relation"]), (target[::-1], INVERSE[wanted["relation"]]))

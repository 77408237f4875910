"""Captions of the shapes world: the prompt grammar in English and Chinese, written and parsed.

The grammar (docs/SHAPES_WORLD.md) has a handful of forms per language; ``FORMS`` names them and
``write_caption`` can write each one, so tests can check that every form is produced and that
every produced caption parses back to its scene. The parser is strict about vocabulary (an
unknown word is an error that names it, so a typo in a prompt file is caught rather than
scored as a failure of the model) and lenient about layout: case, extra spaces and a final
full stop are ignored, and "an" is accepted wherever "a" is.
"""

from __future__ import annotations

import random
import re

from mars_data.shapes.world import COLORS, COLORS_ZH, RELATIONS, RELATIONS_ZH, SHAPES, SHAPES_ZH

LANGS = ("en", "zh")

# form name -> template; {A} and {B} are object phrases, {R} the relation words.
FORMS: dict[str, dict[str, str]] = {
    "en": {
        "en.object": "{A}",
        "en.image_of": "an image of {A}",
        "en.on_white": "{A} on a white background",
        "en.pair": "{A} {R} {B}",
        "en.there_is": "there is {A} {R} {B}",
    },
    "zh": {
        "zh.object": "{A}",
        "zh.on_white": "白色背景上有{A}",
        "zh.pair": "{A}在{B}的{R}",
    },
}
_PAIR_FORMS = {"en.pair", "en.there_is", "zh.pair"}

# The grammar's article is "a" or "one"; before a vowel "an" is written as well, so a model
# trained on these captions knows both what users type ("a orange") and proper English.
_ARTICLES = ("a", "one")
_VOWELS = "aeiou"


def forms_for(lang: str, num_objects: int) -> list[str]:
    """Names of the grammar forms of a language for scenes of one or two objects."""
    if lang not in FORMS:
        raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGS)}")
    return [f for f in FORMS[lang] if (f in _PAIR_FORMS) == (num_objects == 2)]


def _object_phrase(obj: dict, lang: str, rng: random.Random) -> str:
    if lang == "zh":
        return f"一个{COLORS_ZH[obj['color']]}的{SHAPES_ZH[obj['shape']]}"
    articles = _ARTICLES + (("an",) if obj["color"][0] in _VOWELS else ())
    return f"{rng.choice(articles)} {obj['color']} {obj['shape']}"


def write_caption(scene: dict, lang: str, rng: random.Random, form: str | None = None) -> str:
    """A caption of ``scene`` in ``lang`` ("en" or "zh"), in ``form`` or a random form."""
    objects = scene["objects"]
    choices = forms_for(lang, len(objects))
    if form is None:
        form = rng.choice(choices)
    elif form not in choices:
        raise ValueError(f"form {form!r} does not fit a {len(objects)}-object {lang} scene; use one of {choices}")
    phrases = [_object_phrase(obj, lang, rng) for obj in objects]
    relation = scene.get("relation")
    if relation and lang == "zh":
        relation = RELATIONS_ZH[relation]
    return FORMS[lang][form].format(A=phrases[0], B=phrases[-1], R=relation)


# ---------------------------------------------------------------------------------- parsing

_EN_OBJ = r"(?:a|an|one) ({colors}) ({shapes})".format(colors="|".join(COLORS), shapes="|".join(SHAPES))
_EN_REL = "|".join(RELATIONS)
_EN_PATTERNS = {
    "en.object": rf"{_EN_OBJ}",
    "en.image_of": rf"an image of {_EN_OBJ}",
    "en.on_white": rf"{_EN_OBJ} on a white background",
    "en.pair": rf"{_EN_OBJ} ({_EN_REL}) {_EN_OBJ}",
    "en.there_is": rf"there is {_EN_OBJ} ({_EN_REL}) {_EN_OBJ}",
}
_EN_VOCAB = {"a", "an", "one", "image", "of", "on", "white", "background", "there", "is"}
_EN_VOCAB |= set(COLORS) | set(SHAPES) | {w for r in RELATIONS for w in r.split()}

_ZH_COLOR = {v: k for k, v in COLORS_ZH.items()}
_ZH_SHAPE = {v: k for k, v in SHAPES_ZH.items()}
_ZH_RELATION = {v: k for k, v in RELATIONS_ZH.items()}
_ZH_OBJ = "一个({colors})的({shapes})".format(colors="|".join(_ZH_COLOR), shapes="|".join(_ZH_SHAPE))
_ZH_PATTERNS = {
    "zh.object": _ZH_OBJ,
    "zh.on_white": f"白色背景上有{_ZH_OBJ}",
    "zh.pair": "{obj}在{obj}的({rel})".format(obj=_ZH_OBJ, rel="|".join(_ZH_RELATION)),
}
_ZH_VOCAB = sorted(
    {"一个", "的", "在", "白色背景上有"} | set(_ZH_COLOR) | set(_ZH_SHAPE) | set(_ZH_RELATION),
    key=len,
    reverse=True,
)
_CJK = re.compile(r"[\u3400-\u9fff]")


def _normalise(text: str) -> str:
    text = text.strip().rstrip(".!。！")
    if _CJK.search(text):
        return re.sub(r"\s+", "", text)
    return " ".join(text.lower().split())


def _unknown_words(text: str, lang: str) -> list[str]:
    if lang == "en":
        return [w for w in text.split() if w not in _EN_VOCAB]
    unknown, i, current = [], 0, ""
    while i < len(text):  # greedy longest match over the Chinese vocabulary
        word = next((w for w in _ZH_VOCAB if text.startswith(w, i)), None)
        if word is None:
            current += text[i]
            i += 1
            continue
        if current:
            unknown.append(current)
            current = ""
        i += len(word)
    return unknown + ([current] if current else [])


def parse_caption(text: str) -> dict:
    """The scene a grammar prompt asks for: ``{"lang", "form", "scene": {"objects": [{"color",
    "shape"}, ...], "relation"?}}``. Raises ValueError naming unknown words, or saying the words
    are known but do not form a prompt of the grammar."""
    norm = _normalise(text)
    lang = "zh" if _CJK.search(norm) else "en"
    patterns = _ZH_PATTERNS if lang == "zh" else _EN_PATTERNS
    for form, pattern in patterns.items():
        match = re.fullmatch(pattern, norm)
        if match is None:
            continue
        groups = match.groups()
        if lang == "zh":
            names = [_ZH_COLOR.get(g) or _ZH_SHAPE.get(g) or _ZH_RELATION[g] for g in groups]
        else:
            names = list(groups)
        if form in _PAIR_FORMS:
            if lang == "zh":  # A在B的R: colour A, shape A, colour B, shape B, relation
                ca, sa, cb, sb, rel = names
            else:  # A R B
                ca, sa, rel, cb, sb = names
            if (ca, sa) == (cb, sb):
                raise ValueError(f"prompt {text!r} asks for two identical objects; the world's pairs differ")
            objects = [{"color": ca, "shape": sa}, {"color": cb, "shape": sb}]
            return {"lang": lang, "form": form, "scene": {"objects": objects, "relation": rel}}
        color, shape = names
        return {"lang": lang, "form": form, "scene": {"objects": [{"color": color, "shape": shape}]}}

    unknown = _unknown_words(norm, lang)
    if unknown:
        raise ValueError(f"unknown words in prompt {text!r}: {', '.join(repr(w) for w in unknown)}")
    raise ValueError(f"prompt {text!r} uses known words but is not a form of the shapes grammar")

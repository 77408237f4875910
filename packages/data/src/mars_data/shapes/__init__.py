"""The bilingual shapes world (docs/SHAPES_WORLD.md): scenes, renderer, captions, scorer, shards,
the layout restatement, and the task plugin of the generic training module (``task``).

    >>> import random
    >>> from mars_data import shapes
    >>> rng = random.Random(0)
    >>> scene = shapes.sample_scene(rng, num_objects=2)
    >>> image = shapes.render(scene, 64)
    >>> caption = shapes.write_caption(scene, "zh", rng)
    >>> shapes.parse_caption(caption)["scene"]["relation"] == scene["relation"]
    True
    >>> shapes.score_image(image, {"prompt": caption})["spatial"]
    True
"""

from mars_data.shapes.captions import FORMS, LANGS, forms_for, parse_caption, write_caption
from mars_data.shapes.restatement import CANONICAL, INVERSE, caption_correct, parse_restatement, restate_caption, restatement
from mars_data.shapes.scoring import METRICS, detect, ideal_upscale, relation_holds, score_image, summarize
from mars_data.shapes.shards import (
    aspect_size,
    eval_rng,
    heldout_records,
    read_prompts,
    sample_record,
    shard_records,
    write_prompts,
    write_shards,
)
from mars_data.shapes.task import ShapesEvaluator
from mars_data.shapes.world import (
    BACKGROUND,
    COLORS,
    COLORS_ZH,
    RELATION_OFFSETS,
    RELATIONS,
    RELATIONS_ZH,
    SHAPES,
    SHAPES_ZH,
    render,
    sample_scene,
)

__all__ = [
    "BACKGROUND",
    "CANONICAL",
    "INVERSE",
    "ShapesEvaluator",
    "caption_correct",
    "ideal_upscale",
    "parse_restatement",
    "restate_caption",
    "restatement",
    "COLORS",
    "COLORS_ZH",
    "FORMS",
    "LANGS",
    "METRICS",
    "RELATIONS",
    "RELATIONS_ZH",
    "RELATION_OFFSETS",
    "SHAPES",
    "SHAPES_ZH",
    "aspect_size",
    "detect",
    "eval_rng",
    "heldout_records",
    "forms_for",
    "parse_caption",
    "relation_holds",
    "render",
    "sample_record",
    "sample_scene",
    "score_image",
    "shard_records",
    "summarize",
    "write_caption",
    "read_prompts",
    "write_prompts",
    "write_shards",
]

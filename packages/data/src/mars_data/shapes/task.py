"""The shapes world as a task plugin of the generic MARS training module (``mars_app.t2i``).

The generic module knows no world: what a text-to-image prompt's plan is, what captioning
learns to write and how generations are scored are injected by configuration
(conf/model/shapes_t2i.yaml). For the shapes world:

- plan and caption target: ``restate_caption`` (``mars_data.shapes.restatement``), given to
  Hydra as ``{_target_: mars_data.shapes.restate_caption, _partial_: true}``;
- evaluator: ``ShapesEvaluator``, called with the module's generation pipeline (anything with
  ``resolutions``, ``generate(prompts, ...)`` and ``caption(images, ...)``: ``mars_app.pipeline.
  MarsPipeline``): it draws the held-out prompts of a prompt file, scores the images with the
  world's detector and captions the rendered scenes, and returns ``eval/<lang>_<metric>`` and
  ``eval/caption``.
"""

from __future__ import annotations

from pathlib import Path

from mars_data.shapes.restatement import caption_correct
from mars_data.shapes.scoring import score_image, summarize
from mars_data.shapes.shards import read_prompts, write_prompts
from mars_data.shapes.world import render

REPORTED = ("single_binding", "pair_binding", "spatial")


class ShapesEvaluator:
    """Held-out generation and captioning scores of the shapes world.

    Args:
        prompts: a prompt file (JSON Lines of scene records); written with ``seed`` if missing.
        seed: the prompt file's seed (no training job uses it).
        num: prompts scored at the end of training; ``periodic_num`` every ``every_n_steps``.
        cfg_scale: guidance of the greedy generations; ``batch_size``: prompts per call.
    """

    def __init__(
        self,
        prompts: str,
        seed: int = 9001,
        num: int = 400,
        periodic_num: int = 100,
        every_n_steps: int | None = 1000,
        cfg_scale: float = 1.5,
        batch_size: int = 200,
    ):
        self.prompts = Path(prompts)
        self.seed = seed
        self.num = num
        self.periodic_num = periodic_num
        self.every_n_steps = every_n_steps
        self.cfg_scale = cfg_scale
        self.batch_size = batch_size

    def records(self, num: int) -> list[dict]:
        if not self.prompts.exists():
            write_prompts(self.prompts, max(num, self.num), self.seed)
        return read_prompts(self.prompts)[:num]

    def __call__(self, pipeline, num: int | None = None) -> dict[str, float]:
        records = self.records(num or self.num)
        width, height = pipeline.resolutions[0]
        images = pipeline.generate(
            [r["prompt"] for r in records], cfg_scale=self.cfg_scale, temperature=0.0, batch_size=self.batch_size
        )
        captions = pipeline.caption([render(r["scene"], width, height) for r in records], batch_size=self.batch_size)
        metrics = {}
        for lang, summary in summarize([score_image(i, r) for i, r in zip(images, records)]).items():
            for key in REPORTED:
                if summary.get(key) is not None:
                    metrics[f"eval/{lang}_{key}"] = float(summary[key])
        metrics["eval/caption"] = sum(map(caption_correct, captions, records)) / len(records)
        return metrics

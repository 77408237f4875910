"""Score generated images: ``python apps/evaluate.py task=shapes prompts=FILE.jsonl images=DIR``.

task=shapes scores image i of DIR (``00000.png``, ``00001.png``, ...) against row i of the
prompt file with the shapes world's detector (mars_data.shapes); a missing or unreadable
image counts as wrong. It prints the summary and writes ``eval_summary.json`` (per language
en, zh and all: single_binding, pair_binding, spatial, color, shape, count, missing) and
``eval_results.jsonl`` (one row per prompt, with what was found) to ``out`` (default: DIR).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig
from PIL import Image

from mars_data.shapes import METRICS, read_prompts, score_image, summarize

log = logging.getLogger(__name__)


def load_image(path: Path) -> Image.Image | None:
    """The image at ``path``, or None when it is missing or cannot be decoded."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        log.warning("cannot read %s (%s): counted as wrong", path, error)
        return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    header = f"{'lang':<5}" + "".join(f"{m:>16}" for m in METRICS) + f"{'count':>8}{'missing':>9}"
    rows = [header]
    for lang, values in summary.items():
        cells = "".join(f"{'-' if values[m] is None else format(values[m], '.3f'):>16}" for m in METRICS)
        rows.append(f"{lang:<5}{cells}{values['count']:>8}{values['missing']:>9}")
    return "\n".join(rows)


def evaluate(cfg: DictConfig) -> dict:
    """Score the images and write the summary and per-row results; returns the summary."""
    if cfg.task != "shapes":
        raise ValueError(f"unknown evaluation task {cfg.task!r}; known: shapes")
    records = read_prompts(cfg.prompts)
    images = Path(cfg.images)
    results = []
    for index, record in enumerate(records):
        name = cfg.image_name.format(index=index)
        result = score_image(load_image(images / name), record)
        results.append({"index": index, "image": name, "prompt": record["prompt"], **result})
    summary = summarize(results)

    out = Path(cfg.out) if cfg.get("out") else images
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "eval_summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_atomic(
        out / "eval_results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    )
    print(f"shapes evaluation of {len(records)} prompts in {cfg.prompts} against {images}")
    print(format_summary(summary))
    print(f"written: {out / 'eval_summary.json'}, {out / 'eval_results.jsonl'}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()

"""Score generations: ``python apps/evaluate.py task=shapes prompts=FILE.jsonl images=DIR``,
or captions: ``python apps/evaluate.py task=captions prompts=FILE.jsonl captions=FILE.jsonl``.

task=shapes scores image i of DIR (``00000.png``, ``00001.png``, ...) against row i of the
prompt file with the shapes world's detector (mars_data.shapes); a missing or unreadable
image counts as wrong. It prints the summary and writes ``eval_summary.json`` (per language
en, zh and all: single_binding, pair_binding, spatial, color, shape, count, missing) and
``eval_results.jsonl`` (one row per prompt, with what was found) to ``out`` (default: DIR).

task=captions scores the ``{"image", "caption"}`` rows that ``apps/generate.py task=caption``
wrote for ``NNNNN.png`` images of the prompt file's scenes (``python -m mars_data.shapes
render``): a caption is right when it names the scene's colours, shapes and relation
(``mars_data.shapes.caption_correct``: any grammar form in either language, or a restatement). It
prints and writes ``caption_summary.json`` (per language and all: accuracy, count) next to the
captions file (or to ``out``).

task=fid|clipscore|compbench|geneval score the folder that ``apps/generate.py benchmark=...``
wrote (``images=DIR``) with local weights (options in conf/evaluate.yaml) and write
``<task>_summary.json`` (the numbers and the protocol they were measured under) to ``out``
(default: DIR): ``mars_app.evaluation.tasks``, docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from PIL import Image

from mars_app.cli import run_app
from mars_core.io import write_text_atomic
from mars_data.images import ImageError, load_image
from mars_data.shapes import METRICS, read_prompts, score_image, summarize

log = logging.getLogger(__name__)


def read_image(path: Path) -> Image.Image | None:
    """The image at ``path``, or None when it is missing, unreadable or oversized (counted wrong)."""
    if not path.is_file():
        return None
    try:
        return load_image(path)
    except ImageError as error:
        log.warning("%s: counted as wrong", error)
        return None


def format_summary(summary: dict) -> str:
    header = f"{'lang':<5}" + "".join(f"{m:>16}" for m in METRICS) + f"{'count':>8}{'missing':>9}"
    rows = [header]
    for lang, values in summary.items():
        cells = "".join(f"{'-' if values[m] is None else format(values[m], '.3f'):>16}" for m in METRICS)
        rows.append(f"{lang:<5}{cells}{values['count']:>8}{values['missing']:>9}")
    return "\n".join(rows)


def evaluate_captions(cfg: DictConfig) -> dict:
    """Score a captions file against the scenes of the prompt file; returns the summary."""
    from mars_data.shapes import caption_correct

    if not cfg.get("captions"):
        raise ValueError("task=captions needs captions=FILE.jsonl (apps/generate.py task=caption writes it)")
    records = read_prompts(cfg.prompts)
    path = Path(cfg.captions)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    hits: dict[str, list[bool]] = {"en": [], "zh": [], "all": []}
    for row in rows:
        index = int(Path(row["image"]).stem)
        if index >= len(records):
            raise ValueError(f"{path}: image {row['image']} has no row in {cfg.prompts} ({len(records)} rows)")
        record = records[index]
        right = caption_correct(row["caption"], record)
        for lang in {record.get("lang"), "all"} & hits.keys():
            hits[lang].append(right)
    summary = {lang: {"accuracy": sum(h) / len(h) if h else None, "count": len(h)} for lang, h in hits.items()}
    out = Path(cfg.out) if cfg.get("out") else path.parent
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "caption_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"caption evaluation of {len(rows)} captions in {path} against the scenes of {cfg.prompts}")
    for lang, values in summary.items():
        accuracy = "-" if values["accuracy"] is None else f"{values['accuracy']:.3f}"
        print(f"{lang:<5}{accuracy:>10}{values['count']:>8}")
    print(f"written: {out / 'caption_summary.json'}")
    return summary


def evaluate(cfg: DictConfig) -> dict:
    """Score the images (task=shapes, or a benchmark task) or captions (task=captions); returns the summary."""
    if cfg.task not in ("shapes", "captions"):
        # the benchmarks' scorers (torch, torchmetrics: about 2 s) are imported only for them
        from mars_app.evaluation.tasks import TASKS, evaluate_benchmark

        if cfg.task in TASKS:
            return evaluate_benchmark(cfg)
        raise ValueError(f"unknown evaluation task {cfg.task!r}; known: shapes, captions, {', '.join(TASKS)}")
    if not cfg.get("prompts"):
        raise ValueError(f"task={cfg.task} needs prompts=FILE.jsonl")
    if cfg.task == "captions":
        return evaluate_captions(cfg)
    if not cfg.get("images"):
        raise ValueError("task=shapes needs images=DIR")
    images = Path(cfg.images)
    if not images.is_dir():  # else every image would be scored as missing: all zeros, exit 0
        raise FileNotFoundError(f"images={images} is not a directory of generated images")
    records = read_prompts(cfg.prompts)
    results = []
    for index, record in enumerate(records):
        name = cfg.image_name.format(index=index)
        result = score_image(read_image(images / name), record)
        results.append({"index": index, "image": name, "prompt": record["prompt"], **result})
    summary = summarize(results)

    out = Path(cfg.out) if cfg.get("out") else images
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval_summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(
        out / "eval_results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    )
    print(f"shapes evaluation of {len(records)} prompts in {cfg.prompts} against {images}")
    print(format_summary(summary))
    print(f"written: {out / 'eval_summary.json'}, {out / 'eval_results.jsonl'}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app(evaluate, cfg)


if __name__ == "__main__":
    main()

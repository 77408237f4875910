"""Draw with a MARS checkpoint, or caption images with it.

    python apps/generate.py ckpt=DIR prompts=FILE.jsonl out=DIR [grid=true]
    python apps/generate.py ckpt=DIR prompt="a red circle above one blue square"
    python apps/generate.py ckpt=DIR task=caption images=DIR out=FILE.jsonl

task=t2i writes one image per prompt, ``DIR/00000.png``, ``00001.png``, ... in the order of
the prompt file's rows (blank lines skipped, as apps/evaluate.py does), so the evaluator
scores image i against row i; ``grid=true`` also writes ``DIR/grid.png`` with every image
under its index and prompt. task=caption writes one ``{"image", "caption"}`` row per image of
DIR (png/jpg/jpeg, file-name order). Sampling options (cfg_scale, temperature, top_k, top_p,
seed, batch_size, kv_cache, resolution) are in conf/generate.yaml; see docs/GENERATION.md.

Nothing of the user's is overwritten: a non-empty ``out`` (or an existing caption file) is
refused unless ``overwrite=true``, which first removes the images an earlier run left there so
no stale ones remain. Options and inputs are checked before the model loads or anything is
written (``mars_app.cli``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont

from mars_app.cli import check_options, run_app
from mars_app.pipeline import MarsPipeline
from mars_data.shapes import read_prompts

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class GenerateOptions:
    """The typed options of conf/generate.yaml, checked before the model loads."""

    task: str = "t2i"
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 8
    kv_cache: bool = True
    max_new_tokens: int = 48
    grid: bool = False
    grid_columns: int = 8
    overwrite: bool = False


def check_out(cfg: DictConfig) -> None:
    """Refuse to write over earlier results unless ``overwrite=true``; with it, remove the
    images of an earlier run in ``out`` (t2i) so none is left stale."""
    if not cfg.get("out"):
        return  # the run's own new directory
    out = Path(cfg.out)
    if cfg.task == "caption":
        if out.exists() and not cfg.overwrite:
            raise FileExistsError(f"out={out} exists: pass overwrite=true to replace it, or choose another file")
        return
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"out={out} is not empty: pass overwrite=true to replace its images, or choose another directory")
        for path in out.iterdir():
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                path.unlink()
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file: task=t2i writes a directory of images")


def list_images(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{directory} has no {'/'.join(IMAGE_SUFFIXES)} images")
    return paths


def image_grid(images: list[Image.Image], labels: list[str], columns: int = 8, font_path: str | None = None) -> Image.Image:
    """Images in rows of ``columns``, each enlarged to at least 128 px wide, its label under it."""
    scale = max(1, -(-128 // max(image.width for image in images)))
    width = max(image.width for image in images) * scale
    height = max(image.height for image in images) * scale
    font = ImageFont.truetype(font_path, 12) if font_path else ImageFont.load_default(12)
    wrapped = [wrap(label, font, width - 4) for label in labels]
    line = font.getbbox("Ag")[3] + 2
    band = line * max(len(lines) for lines in wrapped) + 4
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + band)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = index % columns * width, index // columns * (height + band)
        grid.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (x, y))
        for number, text in enumerate(lines):
            draw.text((x + 2, y + height + 2 + number * line), text, fill="black", font=font)
    return grid


def wrap(text: str, font, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width``: broken at spaces, or anywhere in text without
    spaces (Chinese)."""
    lines, current = [], ""
    for char in text:
        candidate = current + char
        if font.getlength(candidate) <= width or not current:
            current = candidate
            continue
        head, space, tail = current.rpartition(" ")
        if space and head:  # carry the unfinished word over to the next line
            lines.append(head)
            current = tail + char
        else:
            lines.append(current)
            current = char.lstrip()
    return lines + [current] if current else lines


def generate(cfg: DictConfig) -> dict:
    """Run the configured task; returns {"images": [paths], "grid": path | None} or {"captions": [...], "out": path}."""
    check_options(cfg, GenerateOptions, "conf/generate.yaml")
    if cfg.task not in ("t2i", "caption"):
        raise ValueError(f"unknown task {cfg.task!r}; known: t2i, caption")
    # inputs are checked before the model is loaded
    if cfg.task == "t2i":
        prompts = t2i_prompts(cfg)
    elif not cfg.get("images"):
        raise ValueError("task=caption needs images=DIR")
    else:
        paths = list_images(cfg.images)
    check_out(cfg)
    pipeline = MarsPipeline.from_pretrained(cfg.ckpt, llm_path=cfg.llm_path, device=cfg.device)
    return draw(cfg, pipeline, prompts) if cfg.task == "t2i" else caption(cfg, pipeline, paths)


def t2i_prompts(cfg: DictConfig) -> list[str]:
    if (cfg.get("prompts") is None) == (cfg.get("prompt") is None):
        raise ValueError('task=t2i needs exactly one of prompts=FILE.jsonl and prompt="..."')
    if cfg.get("prompt") is not None:
        if not str(cfg.prompt).strip():
            raise ValueError('prompt="" is empty: write what to draw')
        return [str(cfg.prompt)]
    return [record["prompt"] for record in read_prompts(cfg.prompts)]


def draw(cfg: DictConfig, pipeline: MarsPipeline, prompts: list[str]) -> dict:
    out = Path(cfg.out or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = pipeline.generate(
        prompts,
        cfg_scale=cfg.cfg_scale,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        kv_cache=cfg.kv_cache,
        resolution=cfg.resolution,
        progress=True,
    )
    paths = []
    for index, image in enumerate(images):
        paths.append(out / cfg.image_name.format(index=index))
        image.save(paths[-1])
    grid = None
    if cfg.grid:
        grid = out / "grid.png"
        labels = [f"{index}: {prompt}" for index, prompt in enumerate(prompts)]
        image_grid(images, labels, cfg.grid_columns, cfg.grid_font).save(grid)
    print(f"{len(paths)} images written to {out}" + (f", grid: {grid}" if grid else ""))
    return {"images": paths, "grid": grid}


def caption(cfg: DictConfig, pipeline: MarsPipeline, paths: list[Path]) -> dict:
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "captions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    captions = pipeline.caption(
        images,
        temperature=cfg.temperature or 0.0,
        top_k=cfg.top_k or 0,
        top_p=1.0 if cfg.top_p is None else cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        kv_cache=cfg.kv_cache,
        progress=True,
    )
    rows = [json.dumps({"image": p.name, "caption": c}, ensure_ascii=False) + "\n" for p, c in zip(paths, captions)]
    out.write_text("".join(rows), encoding="utf-8")
    print(f"{len(captions)} captions written to {out}")
    return {"captions": captions, "out": out}


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_app(generate, cfg)


if __name__ == "__main__":
    main()

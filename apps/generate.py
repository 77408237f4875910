"""Draw with a MARS checkpoint, or caption images with it.

    python apps/generate.py ckpt=DIR prompts=FILE.jsonl out=DIR [grid=true]
    python apps/generate.py ckpt=DIR prompt="a red circle above one blue square"
    python apps/generate.py ckpt=DIR task=caption images=DIR out=FILE.jsonl
    python apps/generate.py ckpt=DIR prompts=FILE.jsonl out=DIR superres=SR_DIR tokens_per_step=4 decode=exact

task=t2i writes one image per prompt, ``DIR/00000.png``, ``00001.png``, ... in the order of
the prompt file's rows (blank lines skipped, as apps/evaluate.py does), so the evaluator
scores image i against row i; ``grid=true`` also writes ``DIR/grid.png`` with every image
under its index and prompt. task=caption writes one ``{"image", "caption"}`` row per image of
DIR (png/jpg/jpeg, file-name order). Sampling options (cfg_scale, temperature, top_k, top_p,
seed, batch_size, kv_cache, resolution) are in conf/generate.yaml; see docs/GENERATION.md.
With ``superres=SR_DIR`` (a stage III checkpoint) each base image is upscaled by the cascade
(``mars_app.cascade``): ``DIR/00000.png`` ... are the high-res images, ``save_base=true``
also writes the base ones to ``DIR/base/``, and the grid shows each base image beside its
high-res one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont

from mars_app.cascade import Cascade, SuperResPipeline
from mars_app.pipeline import MarsPipeline
from mars_data.shapes import read_prompts

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    if cfg.task not in ("t2i", "caption"):
        raise ValueError(f"unknown task {cfg.task!r}; known: t2i, caption")
    # inputs are checked before the model is loaded
    if cfg.task == "t2i":
        prompts = t2i_prompts(cfg)
    elif not cfg.get("images"):
        raise ValueError("task=caption needs images=DIR")
    else:
        paths = list_images(cfg.images)
    superres = None
    if cfg.task == "t2i" and cfg.get("superres"):
        superres = SuperResPipeline.from_pretrained(cfg.superres, llm_path=cfg.llm_path, device=cfg.device)
    pipeline = MarsPipeline.from_pretrained(cfg.ckpt, llm_path=cfg.llm_path, device=cfg.device)
    if superres is not None:
        return draw_cascade(cfg, Cascade(pipeline, superres), prompts)
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


def draw_cascade(cfg: DictConfig, cascade: Cascade, prompts: list[str]) -> dict:
    """The cascade: high-res images (and with save_base the base ones), a side-by-side grid."""
    out = Path(cfg.out or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = {k: cfg[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}
    base, high, stats = cascade.generate(
        prompts, tokens_per_step=cfg.tokens_per_step, mode=cfg.decode, seed=cfg.seed, batch_size=cfg.batch_size,
        progress=True, **sampling,
    )
    paths = [out / cfg.image_name.format(index=index) for index in range(len(high))]
    for path, image in zip(paths, high):
        image.save(path)
    if cfg.save_base:
        (out / "base").mkdir(exist_ok=True)
        for index, image in enumerate(base):
            image.save(out / "base" / cfg.image_name.format(index=index))
    grid = None
    if cfg.grid:  # each base image (enlarged to the high-res size) beside its high-res image
        grid = out / "grid.png"
        pairs = [im for b, h in zip(base, high) for im in (b.resize(h.size, Image.NEAREST), h)]
        labels = [f"{index}{' base' if k == 0 else ''}: {prompt}" for index, prompt in enumerate(prompts) for k in (0, 1)]
        image_grid(pairs, labels, 2 * max(1, cfg.grid_columns // 2), cfg.grid_font).save(grid)
    print(
        f"{len(paths)} high-res images written to {out} (K={cfg.tokens_per_step}, {cfg.decode}: {stats.forward_passes} "
        f"forward passes for {stats.tokens} tokens, mean accepted length {stats.mean_accepted_length:.2f})"
        + (f", grid: {grid}" if grid else "")
    )
    return {"images": paths, "grid": grid, "stats": stats}


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
    generate(cfg)


if __name__ == "__main__":
    main()

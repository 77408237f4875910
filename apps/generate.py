"""Draw with a MARS checkpoint, or caption images with it.

    python apps/generate.py ckpt=DIR prompts=FILE.jsonl out=DIR [grid=true]
    python apps/generate.py ckpt=DIR prompt="a red circle above one blue square"
    python apps/generate.py ckpt=DIR task=caption images=DIR out=FILE.jsonl
    python apps/generate.py ckpt=DIR prompts=FILE.jsonl out=DIR superres=SR_DIR tokens_per_step=4 decode=exact

task=t2i writes one image per prompt, ``DIR/00000.png``, ``00001.png``, ... in the order of
the prompt file's rows (blank lines skipped, as apps/evaluate.py does), so the evaluator
scores image i against row i; ``grid=true`` also writes ``DIR/grid.png`` with every image
under its index and prompt. task=caption writes one ``{"image", "caption"}`` row per image of
DIR (png/jpg/jpeg, file-name order; an image of any size is fitted to the trained resolution of
the nearest aspect ratio, and the row says ``"resized": "640x480 -> 64x64"``; an unreadable
file is reported and skipped). Sampling options (cfg_scale, temperature, top_k, top_p,
seed, batch_size, kv_cache, resolution) are in conf/generate.yaml; see docs/GENERATION.md.

``benchmark=coco|compbench|geneval prompts=FILE`` draws a benchmark's prompt file
(``images_per_prompt`` each, image k with seed + k) into the layout its scorers read
(``mars_app.evaluation.benchmarks``; scoring: apps/evaluate.py, docs/EVALUATION.md).

Nothing of the user's is overwritten: a non-empty ``out`` (or an existing caption file) is
refused unless ``overwrite=true``, which first removes the images an earlier run left there so
no stale ones remain. Options and inputs are checked before the model loads or anything is
written (``mars_app.cli``).

With ``superres=SR_DIR`` (a stage III checkpoint) each base image is upscaled by the cascade
(``mars_app.cascade``): ``DIR/00000.png`` ... are the high-res images, ``save_base=true``
also writes the base ones to ``DIR/base/``, and the grid shows each base image beside its
high-res one.
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
from mars_app.cascade import Cascade, SuperResPipeline
from mars_app.pipeline import MarsPipeline
from mars_core.io import write_text_atomic
from mars_data.images import ImageError, load_image
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
    # earlier results are images; a run's own logs (.hydra with hydra.run.dir=out) are not
    if out.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"out={out} holds images: pass overwrite=true to replace them, or choose another directory")
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


# (file, face) of a font with Chinese glyphs, found by path when grid_font is not set: Debian's
# fonts-noto-cjk (`make system-deps`; face 2 is Simplified Chinese), then Fedora's, then macOS's
CJK_FONTS = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc", 2),
    ("/System/Library/Fonts/PingFang.ttc", 0),
)


def grid_font(font_path: str | None = None, size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The labels' font: ``font_path``, else the first CJK font of ``CJK_FONTS`` present, else
    Pillow's default (no Chinese glyphs: one warning)."""
    if font_path:
        try:
            return ImageFont.truetype(font_path, size)
        except OSError as error:
            raise ValueError(f"grid_font={font_path}: not a readable TrueType font ({error})") from error
    for path, face in CJK_FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size, index=face)
    log.warning(
        "no CJK font found (looked for %s): Chinese grid labels will show as boxes; install fonts-noto-cjk "
        "(make system-deps) or set grid_font=FILE", ", ".join(path for path, _ in CJK_FONTS)
    )
    return ImageFont.load_default(size)


def image_grid(images: list[Image.Image], labels: list[str], columns: int = 8, font_path: str | None = None) -> Image.Image:
    """Images in rows of ``columns``, each enlarged to at least 128 px wide, its label under it
    (in ``grid_font(font_path)``)."""
    scale = max(1, -(-128 // max(image.width for image in images)))
    width = max(image.width for image in images) * scale
    height = max(image.height for image in images) * scale
    font = grid_font(font_path)
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
    if cfg.task == "t2i" and cfg.get("benchmark"):
        return draw_benchmark_prompts(cfg)
    # inputs are checked before the model is loaded
    if cfg.task == "t2i":
        prompts = t2i_prompts(cfg)
    elif not cfg.get("images"):
        raise ValueError("task=caption needs images=DIR")
    else:
        paths = list_images(cfg.images)
    check_out(cfg)
    superres = None
    if cfg.task == "t2i" and cfg.get("superres"):
        superres = SuperResPipeline.from_pretrained(cfg.superres, llm_path=cfg.llm_path, device=cfg.device)
    pipeline = MarsPipeline.from_pretrained(cfg.ckpt, llm_path=cfg.llm_path, device=cfg.device)
    if superres is not None:
        return draw_cascade(cfg, Cascade(pipeline, superres), prompts)
    return draw(cfg, pipeline, prompts) if cfg.task == "t2i" else caption(cfg, pipeline, paths)


def draw_benchmark_prompts(cfg: DictConfig) -> dict:
    from mars_app.evaluation.benchmarks import benchmark_plan, draw_benchmark

    plan = benchmark_plan(cfg.benchmark, cfg.prompts, cfg.images_per_prompt, cfg.benchmark_limit)  # checked before loading
    pipeline = MarsPipeline.from_pretrained(cfg.ckpt, llm_path=cfg.llm_path, device=cfg.device)
    options = ("cfg_scale", "temperature", "top_k", "top_p", "seed", "batch_size", "kv_cache", "resolution")
    return draw_benchmark(pipeline, plan, cfg.out or cfg.paths.output_dir, {key: cfg[key] for key in options}, cfg.ckpt)


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
        progress=True, resolution=cfg.resolution, kv_cache=cfg.kv_cache, **sampling,
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
    images, readable = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            readable.append(path)
        except ImageError as error:
            log.warning("skipped: %s", error)
    if not images:
        raise ValueError(f"none of the {len(paths)} images in {cfg.images} could be read")
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
    rows = []
    for path, image, text in zip(readable, images, captions):
        row = {"image": path.name, "caption": text}
        size = pipeline.prepare(image).size
        if size != image.size:  # say what the model read
            row["resized"] = f"{image.width}x{image.height} -> {size[0]}x{size[1]}"
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text_atomic(out, "".join(rows))
    skipped = len(paths) - len(readable)
    print(f"{len(captions)} captions written to {out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    return {"captions": captions, "out": out}


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_app(generate, cfg)


if __name__ == "__main__":
    main()

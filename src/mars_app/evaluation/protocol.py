"""What every benchmark scorer shares: weights checked and hashed, images read, the summary written.

Design choices:
- Every model comes from a local path given by an option; a missing path is one error naming
  the option and pointing at docs/EVALUATION.md. Nothing is downloaded.
- The summary of every task is one JSON object ``{"task", "scores", "protocol"}``: the numbers
  and, beside them, how they were measured (model, weights file and its sha256, image
  preprocessing, number of images scored and skipped, the generation's seed and options read
  from the ``generation.json`` that apps/generate.py wrote). It is written atomically
  (``mars_core.io``) and printed, so a number is never shown without its protocol.
- Images are read with ``mars_data.images.load_image``; an unreadable image is reported,
  listed under ``protocol.skipped`` and left out, never aborting an evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from mars_core.io import sha256_file, write_json_atomic
from mars_data.images import ImageError, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GENERATION_FILE = "generation.json"  # written by apps/generate.py benchmark=... beside the images
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DOCS = "docs/EVALUATION.md"


def weights_record(path: Path) -> dict:
    """``{"weights", "sha256"}`` of a weights file, or of a Hugging Face model directory's weights
    file (for sharded weights, the index file: it names every shard)."""
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            names = ", ".join(HF_WEIGHT_FILES)
            raise FileNotFoundError(f"{path} has no weights file ({names}): is it a save_pretrained directory?")
        path = found[0]
    return {"weights": str(path), "sha256": sha256_file(path)}


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The png/jpg files of ``folder`` (and its subfolders when ``recursive``), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_images(paths: Iterable[Path], skipped: list[str]) -> Iterator[tuple[Path, Image.Image]]:
    """(path, RGB image) for each readable path; an unreadable one is logged and appended to ``skipped``."""
    for path in paths:
        try:
            yield path, load_image(path)
        except ImageError as error:
            log.warning("skipped: %s", error)
            skipped.append(str(error))


def generation_record(folder: Path) -> dict | None:
    """What apps/generate.py recorded about how the images of ``folder`` were drawn (checkpoint,
    seed, images per prompt, sampling options), or None for images from elsewhere."""
    path = folder / GENERATION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_summary(path: Path, task: str, scores: dict, protocol: dict) -> dict:
    """Write ``{"task", "scores", "protocol"}`` to ``path`` atomically and print it; returns it."""
    summary = {"task": task, "scores": scores, "protocol": protocol}
    write_json_atomic(path, summary)
    print(f"{task}: " + ", ".join(f"{name} {format_score(value)}" for name, value in scores.items()))
    print("protocol: " + json.dumps(protocol, ensure_ascii=False, sort_keys=True))
    print(f"written: {path}")
    return summary


def format_score(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)

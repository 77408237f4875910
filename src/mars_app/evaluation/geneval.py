"""GenEval: the layout check, and the summary of the official scorer's results.

GenEval's scorer (``evaluation/evaluate_images.py``) detects objects with a Mask2Former
(mmdetection 2.x, mmcv-full built against CUDA) and classifies colours with CLIP ViT-L/14
(open_clip): neither installs beside this torch without torchvision, so it runs in its own
environment on our layout (docs/EVALUATION.md gives the commands). Here:

- ``check_layout``: the folder is what that scorer reads: ``NNNNN/metadata.jsonl`` holding one
  JSON object with ``tag``, ``include`` and ``prompt`` (its ``json.load``), and
  ``NNNNN/samples/NNNN.png``.
- ``summarize_results``: the scores of its ``results.jsonl`` (one row per image with ``tag``,
  ``correct`` and ``metadata``) computed as its ``summary_scores.py`` does: per tag the share
  of correct images, overall the mean over tags; also correct images and prompts with at least
  one correct image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SAMPLE = re.compile(r"^\d+\.png$")


def check_layout(folder: Path) -> dict:
    """{"prompts", "images", "tags": {tag: prompts}} of a GenEval image folder; ValueError naming the first problem."""
    prompts, images, tags = 0, 0, {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = sub / "metadata.jsonl"
        if not metadata.is_file():
            raise ValueError(f"{sub}: no metadata.jsonl (GenEval's scorer reads one per prompt folder)")
        try:
            row = json.loads(metadata.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}: not one JSON object ({error})") from error
        missing = [key for key in ("tag", "include", "prompt") if key not in row]
        if missing:
            raise ValueError(f"{metadata}: missing {', '.join(missing)}")
        samples = [p for p in (sub / "samples").glob("*.png") if SAMPLE.match(p.name)] if (sub / "samples").is_dir() else []
        if not samples:
            raise ValueError(f"{sub}: no samples/NNNN.png")
        prompts += 1
        images += len(samples)
        tags[row["tag"]] = tags.get(row["tag"], 0) + 1
    if prompts == 0:
        raise ValueError(f"{folder}: no NNNNN/ prompt folders (apps/generate.py benchmark=geneval writes them)")
    return {"prompts": prompts, "images": images, "tags": tags}


def summarize_results(path: Path) -> dict:
    """GenEval's scores from its ``results.jsonl``, as its summary_scores.py computes them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"geneval.results={path} has no rows")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
        by_prompt[row["metadata"]] = by_prompt.get(row["metadata"], False) or bool(row["correct"])
    tags = {tag: sum(hits) / len(hits) for tag, hits in by_tag.items()}
    return {
        "overall": sum(tags.values()) / len(tags),
        **tags,
        "correct_images": sum(sum(hits) for hits in by_tag.values()) / len(rows),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
    }

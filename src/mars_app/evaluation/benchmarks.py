"""Benchmark prompt files in, images out in the layout each benchmark's own scorer reads.

| benchmark | prompt file | images written under ``out`` | default per prompt |
|---|---|---|---|
| ``coco`` | LlamaGen's ``coco_captions.csv`` (column ``Prompt``; 30,000 MS-COCO 2014 val captions), any csv with a ``prompt``/``caption`` column, or COCO's ``captions_val2014.json`` (one caption per image: the lowest annotation id, images by id) | ``samples/NNNNNN.png`` and ``captions.jsonl`` (``{"image", "prompt"}`` rows) | 1 |
| ``compbench`` | T2I-CompBench category files (``color_val.txt``, ...; one prompt a line), one file or a folder of ``*_val.txt`` | ``<category>/samples/<prompt>_NNNNNN.png`` (the index runs over the category's images: its scorers sort by it and read the prompt from the name before the ``_``) | 10 |
| ``geneval`` | GenEval's ``evaluation_metadata.jsonl`` | ``NNNNN/metadata.jsonl`` (that row, one JSON line) and ``NNNNN/samples/NNNN.png`` | 4 |

Design choices:
- A ``BenchmarkPlan`` (every image's prompt and path, the extra files) is built and checked
  before the model loads, so a bad prompt file fails at once.
- Image k of the plan (prompt-major order) draws with seed ``seed + k`` (``MarsPipeline``
  seeds prompt i of a call with seed + i), so each image is fixed by the seed and its index,
  whatever the batch size.
- Nothing is overwritten: a plan whose files already exist under ``out`` is refused.
- ``generation.json`` beside the images records the checkpoint, seed and sampling options;
  apps/evaluate.py copies it into every summary's protocol.
- ``limit`` takes the first N prompts (per category for T2I-CompBench): small subsets for
  checks; the paper's numbers need the full files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from mars_core.io import atomic_path, write_json_atomic, write_text_atomic
from mars_data.shapes import read_prompts

from .protocol import GENERATION_FILE

BENCHMARKS = ("coco", "compbench", "geneval")
IMAGES_PER_PROMPT = {"coco": 1, "compbench": 10, "geneval": 4}
COCO_CAPTIONS = "captions.jsonl"
MAX_NAME_BYTES = 255  # a file name's limit on common filesystems


@dataclass
class BenchmarkPlan:
    benchmark: str
    prompts_file: str
    images_per_prompt: int
    images: list[tuple[str, str]] = field(default_factory=list)  # (relative path, prompt), in seed order
    files: dict[str, str] = field(default_factory=dict)  # relative path -> text, written before the images


def read_coco_captions(path: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{path}: not a COCO captions file (no \"annotations\")")
        first: dict[int, tuple[int, str]] = {}
        for row in data["annotations"]:
            image, key = row["image_id"], row["id"]
            if image not in first or key < first[image][0]:
                first[image] = (key, row["caption"])
        return [" ".join(first[image][1].split()) for image in sorted(first)]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = {name.lower(): name for name in reader.fieldnames or []}
        column = columns.get("prompt") or columns.get("caption")
        if column is None:
            raise ValueError(f"{path}: a csv needs a Prompt or caption column (has: {', '.join(reader.fieldnames or [])})")
        return [row[column].strip() for row in reader]


def read_compbench(path: Path) -> dict[str, list[str]]:
    """{category: prompts} of one category file or of a folder's ``*_val.txt`` files."""
    files = sorted(path.glob("*_val.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} has no T2I-CompBench *_val.txt category files")
    categories = {}
    for file in files:
        category = file.stem.removesuffix("_val")
        prompts = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            prompt = line.strip()
            if not prompt:
                continue
            if "_" in prompt or "/" in prompt:
                raise ValueError(f"{file}:{number}: a prompt with '_' or '/' cannot be written as <prompt>_NNNNNN.png")
            if len(f"{prompt}_000000.png".encode()) > MAX_NAME_BYTES:
                raise ValueError(f"{file}:{number}: prompt too long for a file name ({MAX_NAME_BYTES} bytes)")
            prompts.append(prompt)
        categories[category] = prompts
    return categories


def read_geneval(path: Path) -> list[dict]:
    """GenEval's metadata rows (a JSON Lines prompt file, read as every prompt file is)."""
    rows = read_prompts(path)
    for number, row in enumerate(rows, 1):
        missing = [key for key in ("tag", "include") if key not in row]
        if missing:
            raise ValueError(f"{path}: prompt {number}: a GenEval metadata row needs {', '.join(missing)}")
    return rows


def benchmark_plan(benchmark: str, prompts: str | Path | None, images_per_prompt: int | None = None,
                   limit: int | None = None) -> BenchmarkPlan:
    """Read the benchmark's prompt file and lay out every image to draw."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if not prompts:
        raise ValueError(f"benchmark={benchmark} needs prompts=FILE (the benchmark's prompt file, see docs/EVALUATION.md)")
    path = Path(prompts)
    if not path.exists():
        raise FileNotFoundError(f"prompts={path}: no such file")
    n = IMAGES_PER_PROMPT[benchmark] if images_per_prompt is None else int(images_per_prompt)
    if n < 1:
        raise ValueError(f"images_per_prompt={n}: at least 1")
    plan = BenchmarkPlan(benchmark, str(path), n)
    cut = slice(None) if limit is None else slice(0, int(limit))
    if benchmark == "coco":
        rows = []
        for index, prompt in enumerate(read_coco_captions(path)[cut]):
            for j in range(n):
                name = f"samples/{index * n + j:06d}.png"
                plan.images.append((name, prompt))
                rows.append(json.dumps({"image": name, "prompt": prompt}, ensure_ascii=False) + "\n")
        plan.files[COCO_CAPTIONS] = "".join(rows)
    elif benchmark == "compbench":
        for category, prompts_ in read_compbench(path).items():
            for index, prompt in enumerate(prompts_[cut]):
                for j in range(n):
                    plan.images.append((f"{category}/samples/{prompt}_{index * n + j:06d}.png", prompt))
    else:
        for index, row in enumerate(read_geneval(path)[cut]):
            plan.files[f"{index:05d}/metadata.jsonl"] = json.dumps(row, ensure_ascii=False) + "\n"
            plan.images.extend((f"{index:05d}/samples/{j:04d}.png", row["prompt"]) for j in range(n))
    if not plan.images:
        raise ValueError(f"prompts={path}: no prompts")
    return plan


def draw_benchmark(pipeline, plan: BenchmarkPlan, out: str | Path, sampling: dict, checkpoint: str) -> dict:
    """Draw every image of the plan with ``pipeline.generate`` and write the layout under ``out``.

    ``sampling``: the keyword arguments of ``MarsPipeline.generate`` (seed, batch_size,
    cfg_scale, ...). Returns {"out", "images": count, "generation": the record written}."""
    out = Path(out)
    taken = [name for name in [*plan.files, *(path for path, _ in plan.images), GENERATION_FILE] if (out / name).exists()]
    if taken:
        raise FileExistsError(
            f"{out} already holds {taken[0]} (and {len(taken) - 1} more of this benchmark's files): choose a new out=DIR"
        )
    seed, batch_size = int(sampling.get("seed", 0)), int(sampling.get("batch_size", 8))
    record = {
        "benchmark": plan.benchmark,
        "prompts": plan.prompts_file,
        "images_per_prompt": plan.images_per_prompt,
        "images": len(plan.images),
        "checkpoint": str(checkpoint),
        "checkpoint_sampling_defaults": asdict(pipeline.sampling),
        "sampling": dict(sampling),
        "seeds": f"image k of the layout (prompt-major) draws with seed {seed} + k",
    }
    for name, text in plan.files.items():
        write_text_atomic(out / name, text)
    bar = tqdm(total=len(plan.images), desc=f"drawing {plan.benchmark}", unit="image")
    for start in range(0, len(plan.images), batch_size):
        chunk = plan.images[start : start + batch_size]
        options = {**sampling, "seed": seed + start, "batch_size": batch_size}
        for (name, _), image in zip(chunk, pipeline.generate([prompt for _, prompt in chunk], **options)):
            with atomic_path(out / name) as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(chunk))
    bar.close()
    write_json_atomic(out / GENERATION_FILE, record)
    print(f"{len(plan.images)} images of {plan.benchmark} written to {out}")
    return {"out": out, "images": len(plan.images), "generation": record}

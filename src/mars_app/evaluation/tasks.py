"""apps/evaluate.py's benchmark tasks: options in, one scorer run, ``<task>_summary.json`` out.

Each reads the folder apps/generate.py ``benchmark=...`` wrote (``images=DIR``) and writes its
summary (``protocol.write_summary``) to ``out`` (default: that folder). Models come only from
the paths in the options (conf/evaluate.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mars_core import require_path
from mars_core.io import write_text_atomic

from .benchmarks import COCO_CAPTIONS
from .clipscore import CONVENTION, clip_score, load_clip
from .compbench import BLIP_VQA, BLIP_VQA_PROTOCOL, CLIP_CATEGORIES, OFFICIAL_ONLY, BlipVQA, blip_vqa_score, category_images
from .fid import Preprocess, frechet_inception_distance
from .geneval import check_layout, summarize_results
from .inception import FIDInceptionV3
from .protocol import DOCS, generation_record, read_images, weights_record, write_summary

TASKS = ("fid", "clipscore", "compbench", "geneval")
SOURCES = f" (see {DOCS} for where to get it)"


def evaluate_benchmark(cfg: DictConfig) -> dict:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown benchmark task {cfg.task!r}; known: {', '.join(TASKS)}")
    images = require_path("images", cfg.get("images"), "the generated images (apps/generate.py benchmark=...)")
    out = Path(cfg.out) if cfg.get("out") else images
    return {"fid": fid, "clipscore": clipscore, "compbench": compbench, "geneval": geneval}[cfg.task](cfg, images, out)


def fid(cfg: DictConfig, images: Path, out: Path) -> dict:
    weights = require_path("fid.weights", cfg.fid.weights, "the FID Inception-v3 weights file", directory=False, hint=SOURCES)
    reference = require_path("fid.reference", cfg.fid.reference, "the reference images", hint=SOURCES)
    preprocess = Preprocess(cfg.fid.resize, cfg.fid.crop, cfg.fid.resample)
    network = weights_record(weights)
    value, record = frechet_inception_distance(
        images, reference, FIDInceptionV3.from_file(weights), network["sha256"], preprocess,
        batch_size=cfg.batch_size, cache_dir=Path(cfg.fid.cache_dir) if cfg.fid.cache_dir else None, device=cfg.device,
    )
    protocol = {
        "metric": "torchmetrics FrechetInceptionDistance (float64 statistics)",
        "model": "FID Inception-v3 (TensorFlow 2015-12-05 graph), 2048 pool features, TF1 bilinear resize to 299",
        **network, **record, "generation": generation_record(images),
    }
    return write_summary(out / "fid_summary.json", "fid", {"fid": value}, protocol)


def clipscore(cfg: DictConfig, images: Path, out: Path) -> dict:
    directory = require_path("clip.model", cfg.clip.model, "a local CLIP model directory", hint=SOURCES)
    captions = images / COCO_CAPTIONS
    if not captions.is_file():
        raise FileNotFoundError(f"images={images} has no {COCO_CAPTIONS} (apps/generate.py benchmark=coco writes it)")
    rows = [json.loads(line) for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = {images / row["image"]: row["prompt"] for row in rows}
    skipped: list[str] = []
    pairs = ((image, prompts[path]) for path, image in read_images(list(prompts), skipped))
    model, processor = load_clip(directory)
    value, count = clip_score(model, processor, pairs, total=len(prompts), batch_size=cfg.batch_size, device=cfg.device)
    protocol = {"model": str(directory), "architecture": model.describe(), **weights_record(directory),
                "convention": CONVENTION, "images": count, "skipped": skipped, "generation": generation_record(images)}
    return write_summary(out / "clipscore_summary.json", "clipscore", {"clipscore": value}, protocol)


def compbench(cfg: DictConfig, images: Path, out: Path) -> dict:
    folders = [images] if (images / "samples").is_dir() else sorted(p for p in images.iterdir() if (p / "samples").is_dir())
    if not folders:
        raise ValueError(f"images={images}: no <category>/samples/ folders (apps/generate.py benchmark=compbench writes them)")
    names = {folder.name for folder in folders}
    # every weights path the folders need is checked before any scoring starts
    vqa = clip = None
    models = {}
    if names & set(BLIP_VQA):
        directory = require_path("compbench.blip", cfg.compbench.blip, "a local BLIP VQA model directory", hint=SOURCES)
        vqa = BlipVQA(directory, cfg.device)
        models["blip_vqa"] = {"model": str(directory), **weights_record(directory), **BLIP_VQA_PROTOCOL}
    if names & set(CLIP_CATEGORIES):
        directory = require_path("compbench.clip", cfg.compbench.clip, "a local CLIP model directory", hint=SOURCES)
        clip = load_clip(directory)
        models["clip"] = {"model": str(directory), "architecture": clip[0].describe(), **weights_record(directory),
                          "score": "mean cosine (torchmetrics CLIPScore / 100)"}
    scores, counts, skipped, not_scored, rows = {}, {}, [], {}, []
    for folder in folders:
        category, items = folder.name, category_images(folder)
        if category in BLIP_VQA:
            scores[category], results = blip_vqa_score(vqa, items, skipped, cfg.batch_size, desc=f"BLIP-VQA {category}")
            rows += [{"category": category, **row} for row in results]
            counts[category] = len(results)
        elif category in CLIP_CATEGORIES:
            prompts = dict(items)
            pairs = ((image, prompts[path]) for path, image in read_images(list(prompts), skipped))
            value, counts[category] = clip_score(*clip, pairs, total=len(items), batch_size=cfg.batch_size,
                                                 device=cfg.device, desc=f"CLIP {category}")
            scores[category] = value / 100  # T2I-CompBench's score is the mean raw cosine
        else:
            scorer = OFFICIAL_ONLY.get(category, "a scorer not available here")
            not_scored[category] = f"needs {scorer}: run the official scorer ({DOCS})"
            print(f"compbench {category}: not scored here, {not_scored[category]}")
    if rows:
        write_text_atomic(out / "compbench_results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    protocol = {**models, "images": counts, "skipped": skipped, "not_scored": not_scored,
                "generation": generation_record(images)}
    return write_summary(out / "compbench_summary.json", "compbench", scores, protocol)


def geneval(cfg: DictConfig, images: Path, out: Path) -> dict:
    layout = check_layout(images)
    results = cfg.geneval.results
    if results:
        scores = summarize_results(require_path("geneval.results", results, "the official scorer's results.jsonl", directory=False,
                                                hint=SOURCES))
    else:
        scores = {}
        print(f"geneval: {layout['prompts']} prompts, {layout['images']} images in GenEval's layout; score them with the "
              f"official scorer (see {DOCS}), then pass geneval.results=<its results.jsonl>")
    protocol = {"scorer": "GenEval evaluation/evaluate_images.py (Mask2Former, mmdetection 2.x), run outside this project",
                "results": str(results) if results else None, "layout": layout, "generation": generation_record(images)}
    return write_summary(out / "geneval_summary.json", "geneval", scores, protocol)

"""End to end on CPU: a tiny MARS checkpoint draws a few prompts of each benchmark into its layout
(apps/generate.py benchmark=...), and apps/evaluate.py scores them with tiny random scorer models
saved to disk (FID Inception-v3 with random weights, CLIP, BLIP VQA), writing and printing each
summary with its protocol."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from apps.evaluate import evaluate
from apps.generate import generate
from mars_app.evaluation.inception import FIDInceptionV3
from mars_app.pipeline import MarsPipeline
from mars_core.io import sha256_file
from tests.conftest import ROOT
from tests.test_evaluation import random_images, save_tiny_blip, save_tiny_clip
from tests.test_generate import tiny_pipeline

COCO = ["a red circle", "one blue square left of a green triangle", "an image of a blue circle", "a green square"]
COLOR = ["a red circle and a blue square", "a green triangle and a red square"]
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
    {"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a circle left of a square"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    inception = FIDInceptionV3()  # the real layout, random weights
    for module in inception.modules():  # batch-norm variances that keep 40 random layers from fading to 0
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(0.1)
    torch.save(inception.state_dict(), root / "pt_inception.pth")
    return {
        "ckpt": tiny_pipeline(sampling={"cfg_scale": 2.0, "temperature": 1.0}).save_pretrained(root / "mars"),
        "inception": root / "pt_inception.pth",
        "clip": save_tiny_clip(root / "clip"),
        "blip": save_tiny_blip(root / "blip"),
    }


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    with open(root / "coco_captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Prompt"], *([p] for p in COCO)])
    compbench = root / "compbench"
    compbench.mkdir()
    (compbench / "color_val.txt").write_text("\n".join(COLOR) + "\n")
    (compbench / "non_spatial_val.txt").write_text("a red circle is above a blue square\n")
    (compbench / "spatial_val.txt").write_text("a circle on the left of a square\n")
    (root / "geneval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in GENEVAL))
    return {"coco": root / "coco_captions.csv", "compbench": compbench, "geneval": root / "geneval.jsonl"}


def draw(make_cfg, models, prompts, out, benchmark, *options):
    overrides = [f"ckpt={models['ckpt']}", f"benchmark={benchmark}", f"prompts={prompts}", f"out={out}", "batch_size=3", *options]
    return generate(make_cfg(overrides, "generate"))


def test_coco_fid_and_clipscore_end_to_end(make_cfg, tmp_path, models, prompt_files, capsys):
    out = tmp_path / "coco"
    result = draw(make_cfg, models, prompt_files["coco"], out, "coco", "seed=3", "images_per_prompt=2", "benchmark_limit=2")
    assert result["images"] == 4 and sorted(p.name for p in (out / "samples").iterdir())[-1] == "000003.png"
    pipeline = MarsPipeline.from_pretrained(models["ckpt"])
    for k in (0, 3):  # image k of the layout draws prompt k // 2 with seed 3 + k, whatever the batching
        expected = np.asarray(pipeline.generate(COCO[k // 2], seed=3 + k)[0])
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"samples/{k:06d}.png")), expected)
    generation = json.loads((out / "generation.json").read_text())
    assert generation["sampling"]["seed"] == 3 and generation["images_per_prompt"] == 2

    reference = random_images(tmp_path / "coco_val2014", 4, seed=0, size=(20, 16))
    options = [f"images={out}", f"fid.weights={models['inception']}", f"fid.reference={reference}", "batch_size=4"]
    summary = evaluate(make_cfg(["task=fid", *options], "evaluate"))
    protocol = summary["protocol"]
    assert summary["scores"]["fid"] > 1 and protocol["images"] == 4 and protocol["reference_images"] == 4
    assert protocol["sha256"] == sha256_file(models["inception"]) and protocol["resize"] == 256 and protocol["crop"] == "center"
    assert protocol["generation"]["sampling"]["seed"] == 3
    assert json.loads((out / "fid_summary.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert "fid: fid " in printed and '"sha256": "' in printed and '"resample": "lanczos"' in printed
    assert protocol["reference_cache"].startswith(str(tmp_path / "cache" / "fid"))

    summary = evaluate(make_cfg(["task=clipscore", f"images={out}", f"clip.model={models['clip']}"], "evaluate"))
    assert summary["protocol"]["images"] == 4 and "100 * mean cosine" in summary["protocol"]["convention"]
    assert summary["protocol"]["weights"].endswith("model.safetensors") and summary["scores"]["clipscore"] >= 0
    assert summary["protocol"]["architecture"].startswith("CLIP image tower: patch 8, 32 px, 1 layers, width 16")
    assert (out / "clipscore_summary.json").is_file()


def test_compbench_end_to_end(make_cfg, tmp_path, models, prompt_files, capsys):
    out = tmp_path / "compbench"
    draw(make_cfg, models, prompt_files["compbench"], out, "compbench", "images_per_prompt=2")
    assert (out / f"color/samples/{COLOR[0]}_000000.png").is_file() and (out / f"color/samples/{COLOR[1]}_000003.png").is_file()
    options = [f"images={out}", f"compbench.blip={models['blip']}", f"compbench.clip={models['clip']}"]
    summary = evaluate(make_cfg(["task=compbench", *options], "evaluate"))
    scores, protocol = summary["scores"], summary["protocol"]
    assert set(scores) == {"color", "non_spatial"} and 0 < scores["color"] < 1
    assert protocol["images"] == {"color": 4, "non_spatial": 2} and "spatial" in protocol["not_scored"]
    assert protocol["blip_vqa"]["sha256"] == sha256_file(models["blip"] / "model.safetensors")
    rows = [json.loads(line) for line in (out / "compbench_results.jsonl").read_text().splitlines()]
    assert rows[0]["questions"] == ["a red circle?", "a blue square?"] and len(rows) == 4
    assert np.mean([r["score"] for r in rows]) == pytest.approx(scores["color"])
    assert "compbench spatial: not scored here" in capsys.readouterr().out
    one = evaluate(make_cfg(["task=compbench", f"images={out / 'color'}", f"compbench.blip={models['blip']}",
                             f"out={tmp_path / 'color_only'}"], "evaluate"))  # a single category folder
    assert one["scores"] == {"color": scores["color"]}


def test_geneval_end_to_end(make_cfg, tmp_path, models, prompt_files):
    out = tmp_path / "geneval"
    draw(make_cfg, models, prompt_files["geneval"], out, "geneval", "benchmark_limit=2")
    assert json.loads((out / "00001/metadata.jsonl").read_text()) == GENEVAL[1]
    summary = evaluate(make_cfg(["task=geneval", f"images={out}"], "evaluate"))
    assert summary["scores"] == {} and summary["protocol"]["layout"] == {"prompts": 2, "images": 8, "tags": {"single_object": 1, "position": 1}}
    results = tmp_path / "results.jsonl"  # rows as GenEval's evaluate_images.py writes them
    rows = [{"filename": str(out / f"{i:05d}/samples/{j:04d}.png"), "tag": GENEVAL[i]["tag"], "prompt": GENEVAL[i]["prompt"],
             "correct": i == 0 or j == 0, "reason": "", "metadata": json.dumps(GENEVAL[i])} for i in range(2) for j in range(4)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluate(make_cfg(["task=geneval", f"images={out}", f"geneval.results={results}"], "evaluate"))
    assert summary["scores"]["overall"] == pytest.approx((1 + 0.25) / 2) and summary["scores"]["correct_prompts"] == 1.0


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["task=fid", "images={out}", "fid.reference={out}"], ValueError, "fid.weights is not set"),
        (["task=fid", "images={out}", "fid.weights={tmp}/none.pth", "fid.reference={out}"], FileNotFoundError, r"fid.weights=.*none.pth: no such file"),
        (["task=clipscore", "images={out}", "clip.model={tmp}/clip"], FileNotFoundError, r"clip.model=.*clip: no such directory"),
        (["task=clipscore", "images={out}", "clip.model={out}"], FileNotFoundError, "has no captions.jsonl"),
        (["task=compbench", "images={out}"], ValueError, "no <category>/samples/"),
        (["task=compbench", "images={tmp}/compbench"], ValueError, "compbench.blip is not set"),
        (["task=geneval", "images={tmp}/nowhere"], FileNotFoundError, "images=.*nowhere: no such directory"),
        (["task=shapes", "images={out}"], ValueError, "task=shapes needs prompts=FILE.jsonl"),
    ],
)
def test_evaluate_errors_name_the_option(make_cfg, tmp_path, overrides, error, match):
    out = random_images(tmp_path / "images", 2, seed=0)
    (tmp_path / "compbench/non_spatial/samples").mkdir(parents=True)  # checked before color is scored
    random_images(tmp_path / "compbench/color/samples", 1, seed=0)
    with pytest.raises(error, match=match):
        evaluate(make_cfg([o.format(out=out, tmp=tmp_path) for o in overrides], "evaluate"))


def test_generate_benchmark_refuses_to_overwrite_and_bad_prompt_files(make_cfg, tmp_path, models, prompt_files):
    out = tmp_path / "coco"
    draw(make_cfg, models, prompt_files["coco"], out, "coco", "benchmark_limit=1")
    with pytest.raises(FileExistsError, match="already holds captions.jsonl"):
        draw(make_cfg, models, prompt_files["coco"], out, "coco", "benchmark_limit=1")
    with pytest.raises(ValueError, match="benchmark=coco needs prompts=FILE"):
        generate(make_cfg([f"ckpt={models['ckpt']}", "benchmark=coco", f"out={out}"], "generate"))
    with pytest.raises(FileNotFoundError, match="prompts=.*missing.csv: no such file"):
        draw(make_cfg, models, tmp_path / "missing.csv", out, "coco")


@pytest.mark.slow
def test_documented_command_lines_print_the_protocol(tmp_path, models, prompt_files):
    """The docs/EVALUATION.md commands in subprocesses: draw COCO captions, score CLIPScore."""
    env = {"MARS_ROOT": str(tmp_path), "PATH": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "coco"
    subprocess.run([sys.executable, "apps/generate.py", f"ckpt={models['ckpt']}", "benchmark=coco",
                    f"prompts={prompt_files['coco']}", f"out={out}", "seed=1"], cwd=ROOT, check=True, env=env)
    done = subprocess.run([sys.executable, "apps/evaluate.py", "task=clipscore", f"images={out}", f"clip.model={models['clip']}"],
                          cwd=ROOT, check=True, env=env, capture_output=True, text=True)
    assert "clipscore: clipscore " in done.stdout and '"seed": 1' in done.stdout and '"sha256": "' in done.stdout
    failed = subprocess.run([sys.executable, "apps/evaluate.py", "task=fid", f"images={out}"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "fid.weights is not set" in failed.stderr

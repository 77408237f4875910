"""The data side of the application: apps/evaluate.py and the data configs (shapes, shards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
from PIL import Image

from apps.evaluate import evaluate
from mars_data.shapes import render, write_prompts, write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def generated(tmp_path):
    """A prompt file of 8 rows and its images: renders, except row 3 missing and row 6 blank."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", num=8, seed=0)
    images = tmp_path / "images"
    images.mkdir()
    for index, record in enumerate(prompts):
        if index == 3:
            continue
        image = render(record["scene"], 64) if index != 6 else Image.new("RGB", (64, 64), "white")
        image.save(images / f"{index:05d}.png")
    return tmp_path / "prompts.jsonl", images, prompts


def test_evaluate_scores_rows_in_order_and_writes_next_to_images(make_cfg, generated):
    prompts_file, images, prompts = generated
    cfg = make_cfg(["task=shapes", f"prompts={prompts_file}", f"images={images}"], config_name="evaluate")
    summary = evaluate(cfg)
    # rows cycle (1 obj, en), (2 obj, en), (1 obj, zh), (2 obj, zh): row 3 (2 obj, zh) is
    # missing, row 6 (1 obj, zh) is blank
    assert summary["en"]["single_binding"] == summary["en"]["pair_binding"] == summary["en"]["spatial"] == 1.0
    assert summary["zh"]["single_binding"] == 0.5 and summary["zh"]["pair_binding"] == 0.5
    assert summary["all"]["color"] == summary["all"]["shape"] == 6 / 8
    assert summary["all"]["missing"] == 1 and summary["all"]["count"] == 8
    assert json.loads((images / "eval_summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (images / "eval_results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    assert rows[3]["missing"] and not rows[3]["binding"] and not rows[6]["binding"] and rows[5]["spatial"]


def test_evaluate_writes_to_out_and_refuses_unknown_tasks(make_cfg, generated, tmp_path):
    prompts_file, images, _ = generated
    cfg = make_cfg([f"prompts={prompts_file}", f"images={images}", f"out={tmp_path / 'scores'}"], config_name="evaluate")
    evaluate(cfg)
    assert (tmp_path / "scores" / "eval_summary.json").exists() and not (images / "eval_summary.json").exists()
    cfg = make_cfg(["task=coco", f"prompts={prompts_file}", f"images={images}"], config_name="evaluate")
    with pytest.raises(ValueError, match="unknown evaluation task"):
        evaluate(cfg)


def test_evaluate_captions_per_language(make_cfg, generated, tmp_path):
    prompts_file, _, prompts = generated
    from mars_data.shapes import restatement

    captions = [p["prompt"] for p in prompts]  # the prompt itself: right
    captions[1] = restatement(prompts[1]["scene"])  # a restatement: right
    captions[2] = "a blue circle" if "blue" not in prompts[2]["prompt"] else "a red circle"  # wrong object
    captions[5] = "nonsense words"  # not a caption
    rows = [{"image": f"{i:05d}.png", "caption": c} for i, c in enumerate(captions)]
    captions_file = tmp_path / "captions.jsonl"
    captions_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = make_cfg(["task=captions", f"prompts={prompts_file}", f"captions={captions_file}"], config_name="evaluate")
    summary = evaluate(cfg)
    # rows 0, 1, 4, 5 are en; 2, 3, 6, 7 zh
    assert summary["en"] == {"accuracy": 0.75, "count": 4} and summary["zh"] == {"accuracy": 0.75, "count": 4}
    assert summary["all"]["accuracy"] == 0.75
    assert json.loads((tmp_path / "caption_summary.json").read_text()) == summary
    with pytest.raises(FileNotFoundError, match="captions file"):
        evaluate(make_cfg(["task=captions", f"prompts={prompts_file}", f"captions={tmp_path / 'no.jsonl'}"], config_name="evaluate"))


def test_evaluate_command_line(generated, tmp_path):
    prompts_file, images, _ = generated
    done = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "evaluate.py"), "task=shapes", f"prompts={prompts_file}",
         f"images={images}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "single_binding" in done.stdout and "zh" in done.stdout
    assert json.loads((images / "eval_summary.json").read_text())["en"]["spatial"] == 1.0


def test_shapes_data_config_generates_and_batches(make_cfg):
    cfg = make_cfg(["data=shapes", "data.num_train_samples=24", "data.num_val_samples=8", "data.batch_size=8",
                    "data.size=32", "data.processes=1", "data.aspect_ratios=[1:1,2:1]"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    assert str(datamodule.split_dir("train")).startswith(cfg.paths.data_dir)
    batches = list(datamodule.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 24
    assert {tuple(b["image"].shape[1:]) for b in batches} <= {(3, 32, 32), (3, 32, 64)}
    assert sum(len(b["caption"]) for b in datamodule.val_dataloader()) == 8


def test_shards_data_config_reads_a_shard_directory(make_cfg, tmp_path):
    write_shards(tmp_path / "real", 12, seed=0, size=48, processes=1, progress=False)
    cfg = make_cfg(["data=shards", f"data.train_shards={tmp_path / 'real'}", "data.resolutions=[32x32]", "data.num_workers=0"])
    datamodule = hydra.utils.instantiate(cfg.data)
    (batch,) = list(datamodule.train_dataloader())
    assert batch["image"].shape == (12, 3, 32, 32)
    assert np.isclose(float(batch["image"].max()), 1.0)

"""Kill drills (issue 19): tiny tokenizer, text-LM and stage I runs killed with SIGKILL at five
points (one inside a checkpoint save), resumed from ``last.ckpt`` each time, end with the
weights of the uninterrupted run; ``last.ckpt`` always loads; no temporary file remains."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from mars_data import shapes
from mars_data.tars import npy_member, write_manifest, write_samples
from tests.reliability.drill import run_drill
from tests.test_t2i import make_checkpoints
from tests.test_tokenizer_app import TINY

# chained: killed at step 3, resumed and killed at 5, inside the save of step 6, at 8, at 11
KILLS = [(3, False), (5, False), (6, True), (8, False), (11, False)]
STEPS = ["trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=2", "logger=csv"]

# the tokenizer app's tiny model with a discriminator from step 4 and dead-code restarts every
# 3 steps (they draw random encoder outputs and read the usage counts), on 40 shapes scenes:
# 5 batches an epoch, so the drill crosses two epoch ends
TOKENIZER = [
    "experiment=shapes_tokenizer",
    *(o for o in TINY if o.startswith("model.") and not o.startswith(("model.disc_start", "model.restart_every"))),
    "model.disc_start=4",
    "model.restart_every=3",
    "model.vqgan.codebook_size=32",
    "model.warmup_steps=2",
    "data.num_train_samples=40",
    "data.num_val_samples=0",
    "data.samples_per_shard=16",
    "data.size=32",
    "data.crop=null",  # the recipe cuts 64 px windows of its 64 and 128 px renders
    "data.batch_size=8",
    "data.processes=1",
    "trainer.max_time=null",
]


def check(report: dict, exact: tuple[str, ...] = ("weights", "ema", "quantizer_usage")) -> None:
    assert report["reference_step"] == report["drill_step"] == 12
    assert [k["step"] for k in report["kills"]] == [k for k, _ in KILLS]
    assert all(k["temporaries"] >= 1 for k in report["kills"] if k["during_save"]), "the kill missed the save"
    assert report["unloadable_last"] == []
    assert report["stale_after_restart"] == []
    for group in exact:
        assert report["differences"].get(group, 0.0) <= 1e-6, report


@pytest.mark.slow
def test_tokenizer_run_killed_five_times_ends_like_an_uninterrupted_one(tmp_path):
    check(run_drill([*TOKENIZER, *STEPS], KILLS, tmp_path))


LM = [
    "experiment=shapes_lm",
    "data.make_missing.0.python.3=160",  # 10 batches an epoch: the drill crosses an epoch end
    "data.make_missing.1.python.3=32",
    "data.batch_size=16",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=0",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "+model.config.attention_dropout=0.1",  # random draws in every step: the restored generators matter
]


@pytest.mark.slow
def test_text_lm_run_killed_five_times_ends_like_an_uninterrupted_one(tmp_path):
    check(run_drill([*LM, *STEPS], KILLS, tmp_path))


def stage1_inputs(root: Path) -> list[str]:
    """The stage I tests' tiny text LLM and VQ tokenizer, saved by path, and 40 pre-tokenized
    shapes samples (4x4 codes of the tiny VQ) in two shards with their manifest."""
    saved = make_checkpoints(root)
    rng = random.Random(0)
    records = [shapes.sample_record(rng, size=16) for _ in range(40)]
    codes = np.random.default_rng(0).integers(0, 32, size=(40, 4, 4), dtype=np.int16)
    for shard in range(2):
        samples = {}
        for i in range(shard * 20, shard * 20 + 20):
            _, npy = npy_member("codes.npy", codes[i])
            samples[f"{i:09d}"] = {"txt": records[i]["prompt"].encode(), "json": json.dumps(records[i]).encode(), "codes.npy": npy}
        write_samples(root / "codes" / f"codes-{shard:06d}.tar", samples)
    write_manifest(root / "codes", {f"codes-{s:06d}.tar": 20 for s in range(2)})
    return [
        "experiment=shapes_stage1",
        f"model.llm_path={saved['llm']}",
        f"model.tokenizer_path={saved['vq']}",
        f"data.train_shards={root / 'codes'}",
        "data.batch_size=8",  # 5 batches an epoch, read by one worker process
        "data.shuffle_buffer=16",
        "model.resolutions=[16x16]",
        f"model.evaluator.prompts={root / 'eval.jsonl'}",
        "model.evaluator.num=2",
        "model.evaluator.every_n_steps=1000",
        "model.evaluator.batch_size=2",
        "trainer.max_time=null",
    ]


@pytest.mark.slow
def test_stage1_run_killed_five_times_ends_like_an_uninterrupted_one(tmp_path):
    inputs = stage1_inputs(tmp_path / "inputs")
    report = run_drill([*inputs, *STEPS], KILLS, tmp_path)
    check(report)

"""Kill drills (issue 19): tiny tokenizer, text-LM and stage I runs killed with SIGKILL at five
points (one inside a checkpoint save), resumed from ``last.ckpt`` each time, end with the
weights of the uninterrupted run; ``last.ckpt`` always loads; no temporary file remains."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mars_app.lm_corpus import restatement
from mars_data import shapes
from mars_data.tars import member, npy_member, write_manifest
from mars_semvie.text import qwen_tokenizer
from mars_tokenizer import VQGANConfig, VQTokenizer
from tests.reliability.drill import run_drill

# chained: killed at step 3, resumed and killed at 5, inside the save of step 6, at 8, at 11
KILLS = [(3, False), (5, False), (6, True), (8, False), (11, False)]
STEPS = ["trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=2", "logger=csv"]

TOKENIZER = [
    "experiment=shapes_tokenizer",
    "data.num_train_samples=40",  # 5 batches an epoch: the drill crosses two epoch ends
    "data.num_val_samples=0",
    "data.samples_per_shard=16",
    "data.size=32",
    "data.batch_size=8",
    "data.processes=1",
    "model.vqgan.patch_size=2",
    "model.vqgan.ch=8",
    "model.vqgan.ch_mult=[1,2]",
    "model.vqgan.norm_groups=4",
    "model.vqgan.z_channels=8",
    "model.vqgan.codebook_size=32",
    "model.disc_weight=0.5",
    "model.disc_start=4",
    "model.disc_ndf=8",
    "model.restart_every=3",  # dead-code restarts draw random encoder outputs and read the usage counts
    "model.warmup_steps=2",
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
    "data.make_missing.0.python.4=160",  # 10 batches an epoch: the drill crosses an epoch end
    "data.make_missing.1.python.4=32",
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
    """A tiny text LLM and VQ tokenizer saved by path, and 40 pre-tokenized shapes samples
    (16 px: 4x4 codes of the tiny VQ) in two shards with their manifest."""
    rng = random.Random(0)
    records = [shapes.sample_record(rng, size=16) for _ in range(40)]
    tokenizer = qwen_tokenizer(trim_to=[r["prompt"] for r in records] + [restatement(r["scene"]) for r in records])
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    VQTokenizer(VQGANConfig.from_preset("tiny")).save_pretrained(root / "vq")
    codes = np.random.default_rng(0).integers(0, 32, size=(40, 4, 4), dtype=np.int16)
    (root / "codes").mkdir()
    for shard in range(2):
        with tarfile.open(root / "codes" / f"codes-{shard:06d}.tar", "w") as tar:
            for i in range(shard * 20, shard * 20 + 20):
                for info, data in (
                    member(f"{i:09d}.txt", records[i]["prompt"].encode()),
                    member(f"{i:09d}.json", json.dumps(records[i]).encode()),
                    npy_member(f"{i:09d}.codes.npy", codes[i]),
                ):
                    tar.addfile(info, io.BytesIO(data))
    write_manifest(root / "codes", {f"codes-{s:06d}.tar": 20 for s in range(2)})
    return [
        "experiment=shapes_stage1",
        f"model.llm_path={root / 'llm'}",
        f"model.tokenizer_path={root / 'vq'}",
        f"data.train_shards={root / 'codes'}",
        "data.batch_size=8",  # 5 batches an epoch, read by one worker process
        "data.shuffle_buffer=16",
        "model.resolutions=[16x16]",
        f"model.evaluation.prompts={root / 'eval.jsonl'}",
        "model.evaluation.num=2",
        "model.evaluation.every_n_steps=1000",
        "model.evaluation.batch_size=2",
        "trainer.max_time=null",
    ]


@pytest.mark.slow
def test_stage1_run_killed_five_times_ends_like_an_uninterrupted_one(tmp_path):
    inputs = stage1_inputs(tmp_path / "inputs")
    report = run_drill([*inputs, *STEPS], KILLS, tmp_path)
    check(report, exact=("weights",))
    if report["differences"]["ema"] > 1e-6:
        # Known (2026-12-02): TextToImageModule updates its EMA in on_train_batch_end, which
        # Lightning calls after the callbacks' hook where ModelCheckpoint saves; each checkpoint
        # therefore misses the step's EMA update. Fix in mars_app/t2i.py (the lead's rewrite),
        # then make this a plain assertion.
        pytest.xfail(f"EMA off by {report['differences']['ema']:.2e} after resuming (update after the save)")

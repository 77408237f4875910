"""Kill drills (issue 19): tiny tokenizer, text-LM and stage I runs killed with SIGKILL at five
points (one inside a checkpoint save), resumed from ``last.ckpt`` each time, end with the
weights of the uninterrupted run; ``last.ckpt`` always loads; no temporary file remains."""

from __future__ import annotations

import pytest

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


def check(report: dict) -> None:
    assert report["reference_step"] == report["drill_step"] == 12
    assert [k["step"] for k in report["kills"]] == [k for k, _ in KILLS]
    assert all(k["temporaries"] >= 1 for k in report["kills"] if k["during_save"]), "the kill missed the save"
    assert report["unloadable_last"] == []
    assert report["stale_after_restart"] == []
    assert report["max_difference"] <= 1e-6, report


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

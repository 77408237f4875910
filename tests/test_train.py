"""The training entry point and its machinery: configs, strategies, checkpoints, resuming, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from apps.train import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
TINY = ["+model._target_=tests.tiny_module.TinyRegression", "+data._target_=tests.tiny_module.TinyData"]


def run_cli(args: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run apps/train.py as a user would; the run writes under cwd (paths.root_dir). ``check``:
    it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_ROOT": str(cwd)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}"])
    assert cfg.model is not None and "_target_" in cfg.model
    assert cfg.data is not None and "_target_" in cfg.data
    OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("stage,per_gpu,global_batch,epochs", [("stage1", 64, 4096, 1), ("stage2", 64, 4096, 2), ("stage3", 24, 1536, 1)])
def test_paper_stages_carry_paper_settings(make_cfg, stage, per_gpu, global_batch, epochs):
    cfg = make_cfg([f"experiment={stage}"])
    optimizer = cfg.model.optimizer
    assert optimizer._partial_ and list(optimizer.betas) == [0.9, 0.95]
    assert optimizer.lr == 1e-4 and optimizer.weight_decay == 0.1
    assert cfg.model.warmup_ratio == 0.01
    assert cfg.data.batch_size == per_gpu
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    assert per_gpu * world * cfg.trainer.accumulate_grad_batches == global_batch
    assert cfg.trainer.max_epochs == epochs
    assert cfg.trainer.strategy.stage == 3 and cfg.trainer.precision == "bf16-mixed"


def test_unknown_config_key_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        make_cfg(["trainer.not_a_key=1"])


def test_train_without_experiment_says_what_to_do(make_cfg):
    with pytest.raises(ValueError, match="experiment="):
        train(make_cfg([]))


def test_fit_writes_metrics_logs_checkpoint_and_resumes(make_cfg, tmp_path):
    cfg = make_cfg([*TINY, "trainer.max_steps=6", "trainer.log_every_n_steps=1"])
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert metrics["global_step"] == 6
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6
    assert (run / "csv" / "metrics.csv").exists()
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists()

    resumed = make_cfg([*TINY, "trainer.max_steps=10", f"ckpt_path={last}"])
    assert train(resumed)["global_step"] == 10

    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(make_cfg([*TINY, f"ckpt_path={tmp_path / 'missing.ckpt'}"]))


def test_deepspeed_zero3_two_cpu_processes_fit_save_and_resume(tmp_path):
    args = [*TINY, "trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=2"]
    run_cli([*args, "trainer.max_steps=4", "hydra.run.dir=first"], cwd=tmp_path)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "latest").exists()
    assert not list(checkpoint.parent.glob("*.tmp")), "a temporary checkpoint was left behind"

    run_cli([*args, "trainer.max_steps=8", f"ckpt_path={checkpoint}", "hydra.run.dir=second"], cwd=tmp_path)
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["global_step"] == 8


def test_multirun_leaves_metrics_per_job_and_a_summary(tmp_path):
    proc = run_cli(["-m", *TINY, "trainer.max_steps=3", "+model.lr=0.01,0.1", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    sweep = tmp_path / "sweep"
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").exists()
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[1].startswith("0,+model.lr=0.01,ok") and summary[2].startswith("1,+model.lr=0.1,ok")
    assert "summary.md" in proc.stdout

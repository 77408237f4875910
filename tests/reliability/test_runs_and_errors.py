"""Runs never share or clobber, and bad input gets one clear line (issue 19): generate refuses a
non-empty ``out`` unless ``overwrite=true`` (which leaves no stale image), evaluate refuses a
missing image folder, option types are checked before any model loads, metrics are appended
on resume, two runs started together get their own directories, and the apps print
``error: ...`` without a traceback and exit 2 for bad input."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.generate import generate
from apps.train import train
from mars_app.cli import OptionError
from tests.conftest import compose_config
from tests.test_generate import tiny_pipeline
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[2]


def app(name: str, args: list[str], cwd: Path, **extra_env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_ROOT": str(cwd), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra_env)
    return subprocess.run([sys.executable, str(ROOT / "apps" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("ckpt") / "mars")


def test_generate_refuses_a_non_empty_out_and_overwrite_leaves_no_stale_image(make_cfg, ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for index in range(3):  # an earlier run's three images
        (out / f"{index:05d}.png").write_bytes(b"earlier")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        generate(make_cfg([f"ckpt={ckpt}", "prompt=a red circle", f"out={out}"], config_name="generate"))
    assert (out / "00002.png").read_bytes() == b"earlier"
    generate(make_cfg([f"ckpt={ckpt}", "prompt=a red circle", f"out={out}", "overwrite=true"], config_name="generate"))
    assert sorted(p.name for p in out.iterdir()) == ["00000.png"]


def test_generate_into_its_own_run_directory(make_cfg, ckpt, tmp_path):
    """hydra.run.dir=out (as apps/demo.py runs it): Hydra's own logs there are not earlier results."""
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("task: t2i\n")
    (out / "generate.log").write_text("")
    generate(make_cfg([f"ckpt={ckpt}", "prompt=a red circle", f"out={out}"], config_name="generate"))
    assert (out / "00000.png").is_file()


def test_option_types_are_checked_before_the_model_loads(make_cfg, tmp_path):
    # ckpt does not exist: the option error comes first, so nothing was loaded
    for option in ("cfg_scale=abc", "top_k=1.5", "kv_cache=maybe"):
        with pytest.raises(OptionError, match=option.split("=")[0]):
            generate(make_cfg([f"ckpt={tmp_path / 'nowhere'}", "prompt=a red circle", option], config_name="generate"))


def test_train_options_are_checked_before_anything_is_built(make_cfg):
    with pytest.raises(OptionError, match="seed='x'"):
        train(make_cfg([*TINY, "seed=x"]))


def test_apps_print_one_line_and_exit_2_for_bad_input(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n')
    cases = [
        ("generate", [f"ckpt={tmp_path}", "prompt=a red circle", "cfg_scale=abc"], "cfg_scale='abc' is not valid"),
        ("evaluate", ["task=shapes", f"prompts={prompts}", f"images={tmp_path / 'typo'}"], "is not a directory of generated images"),
    ]
    for name, args, message in cases:
        proc = app(name, args, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "typo").exists()  # evaluate created nothing
    full = app("evaluate", cases[1][1], tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_metrics_are_appended_when_a_run_directory_resumes(make_cfg):
    first = make_cfg([*TINY, "trainer.max_steps=4", "trainer.log_every_n_steps=1", "logger=csv"])
    train(first)
    metrics = Path(first.paths.output_dir) / "csv" / "metrics.csv"
    before = list(csv.DictReader(metrics.open()))
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg([*TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=1", "logger=csv", f"ckpt_path={last}"])
    assert resumed.paths.output_dir == first.paths.output_dir
    train(resumed)
    rows = list(csv.DictReader(metrics.open()))
    assert rows[: len(before)] == before and len(rows) > len(before)
    assert max(int(r["step"]) for r in rows) == 7


def test_last_checkpoint_is_written_first_and_loads(make_cfg):
    cfg = make_cfg([*TINY, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2"])
    train(cfg)
    directory = Path(cfg.paths.output_dir) / "checkpoints"
    last, step = directory / "last.ckpt", directory / "step0000006.ckpt"
    assert last.stat().st_mtime_ns <= step.stat().st_mtime_ns
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step0000006.ckpt"]


def test_a_run_resumed_in_a_copied_directory_keeps_last_checkpoint_the_newest(make_cfg, tmp_path):
    first = make_cfg([*TINY, "trainer.max_steps=4"])
    train(first)
    moved = tmp_path / "moved"
    shutil.copytree(first.paths.output_dir, moved / "run")
    last = moved / "run" / "checkpoints" / "last.ckpt"
    train(compose_config([*TINY, "trainer.max_steps=8", f"ckpt_path={last}"], moved))
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert not list(last.parent.glob("last-v*"))


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_directories(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "apps" / "train.py"), *TINY, "trainer.max_steps=1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2 and all((run / "metrics.json").exists() for run in runs)

"""No code runs from any checkpoint the apps load (issue 19).

Each test puts a crafted pickle payload (an object whose unpickling creates a marker file) in
one checkpoint format: a Lightning ``.ckpt`` resumed by ``apps/train.py``, a DeepSpeed
checkpoint directory resumed with ``trainer=deepspeed_zero3``, the weights of a MARS pipeline
directory and of a VQ tokenizer directory (with their sha256 updated to the crafted file, so
the loader itself is what refuses), and a taming checkpoint imported without ``trusted``. The
load must fail with an error naming the file, and the marker must not exist. A control test
shows that the payload does run under ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.train import train
from mars_app.cli import CheckpointError
from mars_app.pipeline import MarsPipeline
from mars_core.io import sha256_file
from mars_tokenizer import VQGANConfig, VQTokenizer
from mars_tokenizer.taming import tokenizer_from_taming
from tests.test_generate import tiny_pipeline
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path: Path, marker: Path, content: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(content or {}), "payload": Payload(marker)}, path)
    return path


def test_control_the_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    torch.load(craft(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_lightning_resume_refuses_a_crafted_checkpoint(make_cfg, tmp_path):
    first = make_cfg([*TINY, "trainer.max_steps=2"])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    real = torch.load(last, weights_only=True)  # a real checkpoint, plus the payload
    marker = tmp_path / "ran"
    evil = craft(tmp_path / "evil.ckpt", marker, real)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        train(make_cfg([*TINY, "trainer.max_steps=4", f"ckpt_path={evil}"]))
    assert not marker.exists()


@pytest.mark.slow  # DeepSpeed starts in a process of its own (about 40 s)
def test_deepspeed_resume_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.ckpt"
    (checkpoint / "checkpoint").mkdir(parents=True)
    (checkpoint / "latest").write_text("checkpoint")
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        craft(checkpoint / "checkpoint" / name, marker, {"module": None})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "train.py"), *TINY, "trainer=deepspeed_zero3", "trainer.accelerator=cpu",
         "trainer.devices=1", "trainer.precision=32-true", "trainer.max_steps=2", f"ckpt_path={checkpoint}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "model_states.pt holds pickled objects beyond weights" in proc.stdout + proc.stderr
    assert not marker.exists()


def _replace_weights(directory: Path, weights: Path, manifest: str, marker: Path) -> None:
    """Overwrite ``weights`` with a pickle payload and record its sha256 in ``manifest``."""
    craft(weights, marker)
    config = json.loads((directory / manifest).read_text())
    config["sha256"][weights.relative_to(directory).as_posix()] = sha256_file(weights)
    (directory / manifest).write_text(json.dumps(config))


@pytest.mark.parametrize("weights", ["semvie/semvie.safetensors", "tokenizer/model.safetensors"])
def test_pipeline_load_refuses_pickled_weights(tmp_path, weights):
    directory = tiny_pipeline().save_pretrained(tmp_path / "mars")
    marker = tmp_path / "ran"
    _replace_weights(directory, directory / weights, "mars.json", marker)
    if weights.startswith("tokenizer/"):  # the tokenizer's own config checks it too: update it as well
        _replace_weights(directory / "tokenizer", directory / weights, "config.json", marker)
        config = json.loads((directory / "mars.json").read_text())
        config["sha256"]["tokenizer/config.json"] = sha256_file(directory / "tokenizer" / "config.json")
        (directory / "mars.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=Path(weights).name):
        MarsPipeline.from_pretrained(directory)
    assert not marker.exists()


def test_tokenizer_load_refuses_pickled_weights(tmp_path):
    directory = VQTokenizer(VQGANConfig.from_preset("tiny")).save_pretrained(tmp_path / "vq")
    marker = tmp_path / "ran"
    _replace_weights(directory, directory / "model.safetensors", "config.json", marker)
    with pytest.raises(ValueError, match="model.safetensors"):
        VQTokenizer.from_pretrained(directory)
    assert not marker.exists()


def test_taming_import_without_trusted_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "ran"
    evil = craft(tmp_path / "last.ckpt", marker, {"state_dict": {}})
    with pytest.raises(ValueError, match="last.ckpt"):
        tokenizer_from_taming(evil, {"embed_dim": 4, "n_embed": 32, "ddconfig": {}})
    assert not marker.exists()

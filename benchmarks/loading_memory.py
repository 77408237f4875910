"""Peak host memory of building MARS around a mid-size LLM and taking one training step.

    python benchmarks/loading_memory.py [--hidden 896 --layers 24 --batch 2]
    python benchmarks/loading_memory.py --ranks 2 [--before /path/to/an/older/checkout]

A random Qwen2 of Qwen2-0.5B's shape (hidden 896, 24 layers, 151,936-entry vocabulary) is
saved in bf16 with the real Qwen tokenizer, beside an f16 VQ tokenizer with 8,192 codes. Each
setting then runs in a fresh process: ``TextToImageModule`` is built (the LLM loaded, SemVIE's
expert copies made) and one forward + backward of a stage I batch (prompt + 16x16 image codes)
is taken; the process reports its peak resident memory (ru_maxrss) after building and after
the step. The settings, side by side in one run:

- before: the LLM loaded in float32, the loss over every target's logits at once (the code
  before ``llm_dtype`` / ``loss_chunk``);
- after: the LLM loaded in bfloat16 (the precision DeepSpeed trains in) and the loss in chunks
  of 1,024 target positions.

With ``--ranks 2`` the same checkpoints train one step of ``experiment=stage1`` under DeepSpeed
ZeRO-3 with two CPU processes (fp32), through ``apps/train.py``; each rank reports its peak
resident memory once the model is built, once DeepSpeed has set up (optimizer states) and
after the step (``PeakMemory``; a rank killed for memory is reported as such). ``--before DIR`` runs the same command
with the code of another checkout first, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback

SETTINGS = {"before": ("float32", 0), "after": ("bfloat16", 1024)}

STEP = r"""
import json, resource, sys, torch
from mars_app.t2i import TextToImageModule
llm, vq, dtype, chunk, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
module = TextToImageModule(llm, vq, optimizer=None, llm_dtype=dtype, loss_chunk=chunk, resolutions=["256x256"], ema_decay=None)
module.configure_model()
built = peak()
codes = torch.randint(0, 8192, (batch, 16, 16))
captions = ["a photo of a red car parked on a street in the evening light"] * batch
import random
inputs = module.sequences({"codes": codes, "caption": captions}, random.Random(0))
module(**inputs, return_logits=False).loss.backward()
print(json.dumps({"built_gb": built, "step_gb": peak()}))
"""


def make_checkpoints(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mars_semvie.text import qwen_tokenizer
    from mars_tokenizer import VQGANConfig, VQTokenizer

    config = Qwen2Config(
        vocab_size=151_936, hidden_size=hidden, intermediate_size=hidden * 11 // 2, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    with torch.device("cpu"):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    llm.save_pretrained(root / "llm")
    qwen_tokenizer().save_pretrained(root / "llm")
    params = sum(p.numel() for p in llm.parameters())
    del llm
    vq = VQGANConfig(resolution=256, patch_size=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                     codebook_size=8192, codebook_dim=4, norm_groups=4)
    VQTokenizer(vq).save_pretrained(root / "vq")
    print(f"random Qwen2: {params / 1e6:.0f}M parameters, hidden {hidden}, {layers} layers", flush=True)
    return root / "llm", root / "vq"


class PeakMemory(Callback):
    """Each rank prints its peak resident memory (GB) once the model is built (after Lightning's
    ``configure_model``, before DeepSpeed sets up), once DeepSpeed has set up (its optimizer
    states allocated) and when training ends."""

    @staticmethod
    def _report(trainer, when: str) -> None:
        print(f"PEAK rank {trainer.global_rank} {when} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}", flush=True)

    def setup(self, trainer, pl_module, stage) -> None:
        build = pl_module.configure_model  # called next by the trainer; no hook runs between it and DeepSpeed's setup

        def configure_model():
            build()
            self._report(trainer, "1-model")

        pl_module.configure_model = configure_model

    def on_train_start(self, trainer, pl_module) -> None:
        self._report(trainer, "2-engine")

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer, "3-step")


def train_two_ranks(repo: Path, python: str, llm: Path, vq: Path, shards: Path, out: Path) -> dict:
    command = [
        python, str(repo / "apps" / "train.py"), "experiment=stage1", "trainer=deepspeed_zero3", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.precision=32-true", f"model.llm_path={llm}", f"model.tokenizer_path={vq}",
        f"data.train_shards={shards}", "data.batch_size=1", "data.num_workers=0", "data.resampled=true",
        "data.samples_per_epoch=8", "trainer.max_steps=1", "model.export_dir=null", "logger=csv",
        "+callbacks.memory._target_=benchmarks.loading_memory.PeakMemory", f"hydra.run.dir={out}",
    ]
    # a fixed mmap threshold: glibc then returns freed large blocks to the system at once, so the
    # peak shows what a rank holds (with its adaptive threshold a rank built under zero.Init kept
    # the full-size blocks it freed: 2.6-2.9 GB resident after loading the LLM instead of 1.6)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    peaks = {}
    for rank, when, gb in re.findall(r"PEAK rank (\d+) ([\w-]+) ([\d.]+)", proc.stdout + proc.stderr):  # may share a line with a progress bar
        peaks[f"rank {rank} {when}"] = float(gb)
    if proc.returncode and not peaks:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    if proc.returncode:  # built, then failed (e.g. a rank killed for memory): say so
        peaks["failed after building"] = proc.stderr.strip().splitlines()[-1][:200]
    return peaks


def write_codes_shard(directory: Path) -> Path:
    import numpy as np

    from mars_data.tars import npy_member, write_samples

    rng = np.random.default_rng(0)
    samples = {}
    for i in range(8):
        _, codes = npy_member("codes.npy", rng.integers(0, 8192, (16, 16), dtype=np.int16))
        samples[f"{i:09d}"] = {"txt": b"a photo of a red car parked on a street", "codes.npy": codes}
    write_samples(directory / "000000.tar", samples)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    parser.add_argument("--before", type=Path, help="with --ranks 2: a checkout whose code is the 'before'")
    parser.add_argument("--before-python", default=sys.executable)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm, vq = make_checkpoints(Path(tmp), args.hidden, args.layers)
        if args.ranks == 2:
            shards = write_codes_shard(Path(tmp) / "codes")
            runs = {"after": (Path(__file__).resolve().parents[1], sys.executable)}
            if args.before:
                runs = {"before": (args.before, args.before_python), **runs}
            for name, (repo, python) in runs.items():
                peaks = train_two_ranks(repo, python, llm, vq, shards, Path(tmp) / name)
                print(f"{name:6s} ({repo}): " + ", ".join(f"{k} {v:.2f} GB" if isinstance(v, float) else f"{k}: {v}"
                                                          for k, v in sorted(peaks.items())), flush=True)
            return
        results = {}
        for name, (dtype, chunk) in SETTINGS.items():
            proc = subprocess.run([sys.executable, "-c", STEP, str(llm), str(vq), dtype, str(chunk), str(args.batch)],
                                  capture_output=True, text=True, check=True)
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:7s} llm_dtype={dtype:8s} loss_chunk={chunk:5d}: peak after build {results[name]['built_gb']:.2f} GB, "
                  f"after one step (batch {args.batch}) {results[name]['step_gb']:.2f} GB", flush=True)
    for key in ("built_gb", "step_gb"):
        print(f"{key}: after / before = {results['after'][key] / results['before'][key]:.2f}")


if __name__ == "__main__":
    main()

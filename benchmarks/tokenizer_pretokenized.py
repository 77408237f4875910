"""Training-time input speed: pre-tokenized shards (codes only) vs encoding images on the fly.

    python benchmarks/tokenizer_pretokenized.py [--tokenizer DIR | --preset shapes|paper] [--num-samples 2000] [--batch-size 64]

Writes shapes-world shards (at the tokenizer's resolution: 64 px for ``shapes``, 256 px for the
paper's tokenizer) to a temporary directory, pre-tokenizes them with
``apps/tokenize_shards.py`` (the user's command), then reads the same samples two ways, side by
side in this process, as a language-model training loop would get its visual ids:
- on the fly: ``ShardDataModule(load_images=True)``, decode PNGs, ``tokenizer.encode`` each batch;
- pre-tokenized: ``ShardDataModule(load_images=False, load_codes=True)``: image bytes are never
  decoded, the codes are read from ``codes.npy``.
Both use the same batch size and no DataLoader workers; the figure is samples / wall-clock
seconds over one pass, after one warm-up pass. Without ``--tokenizer`` a freshly initialised
``--preset`` is used (encoding cost does not depend on the weights). The ratio grows with the
encoder's cost: the tiny shapes encoder at 64 px is cheap, the paper's at 256 px is not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mars_data import ShardDataModule
from mars_data.shapes import write_shards
from mars_tokenizer import VQGANConfig, VQTokenizer

ROOT = Path(__file__).resolve().parents[1]


def samples_per_second(datamodule: ShardDataModule, step) -> float:
    for batch in datamodule.train_dataloader():  # warm-up pass: file cache, allocator, threads
        step(batch)
    count, start = 0, time.perf_counter()
    for batch in datamodule.train_dataloader():
        step(batch)
        count += len(batch["caption"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="a saved VQTokenizer directory (default: an untrained --preset)")
    parser.add_argument("--preset", default="shapes", help="VQGANConfig preset when no --tokenizer is given")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer:
            tokenizer_dir = Path(args.tokenizer)
        else:
            tokenizer_dir = VQTokenizer(VQGANConfig.from_preset(args.preset)).save_pretrained(tmp / "tokenizer")
        tokenizer = VQTokenizer.from_pretrained(tokenizer_dir)
        size = tokenizer.config.resolution
        write_shards(tmp / "images", args.num_samples, seed=0, size=size, samples_per_shard=500, processes=1, progress=False)
        subprocess.run(
            [sys.executable, str(ROOT / "apps" / "tokenize_shards.py"), f"tokenizer={tokenizer_dir}",
             f"input={tmp / 'images'}", f"output={tmp / 'codes'}", f"paths.log_dir={tmp / 'logs'}"],
            check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        )
        loader = dict(batch_size=args.batch_size, shuffle_buffer=0, num_workers=0)
        codes_sum = torch.zeros((), dtype=torch.long)

        def encode(batch: dict) -> None:
            nonlocal codes_sum
            codes_sum += tokenizer.encode(batch["image"]).sum()

        def read(batch: dict) -> None:
            nonlocal codes_sum
            codes_sum += batch["codes"].sum()

        print(f"{args.num_samples} samples at {size} px, batch {args.batch_size}, tokenizer "
              f"{tokenizer.config.downsample}x downsampling, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}")
        on_the_fly = samples_per_second(ShardDataModule(str(tmp / "images"), **loader), encode)
        pretokenized = samples_per_second(
            ShardDataModule(str(tmp / "codes"), load_images=False, load_codes=True, **loader), read
        )
    print(f"on the fly (decode PNG + encode): {on_the_fly:10.1f} samples/s")
    print(f"pre-tokenized (codes.npy only):   {pretokenized:10.1f} samples/s")
    print(f"ratio: {pretokenized / on_the_fly:.1f}x")


if __name__ == "__main__":
    main()

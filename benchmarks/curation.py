"""Curation speed, Ray Data (2 workers) against a plain single-process loop, side by side.

    OMP_NUM_THREADS=1 python benchmarks/curation.py [--shards 16] [--samples-per-shard 100] [--repeats 2]

Two workloads over the same img2dataset-style shards (JPEGs of 224-400 px, some under the
size threshold): the size filter alone (read, decode, filter, write) and CLIP scoring with a
small random CLIP (64 px input, 2 layers, width 64) added. The Ray runs use ``curate`` with 2
read tasks and 2 CLIP actors on a local instance started once beforehand; the plain loop runs
the same functions (``read_shard``, ``ClipAesthetic`` on whole shards, ``Selector``,
``write_shard``) in this process with one torch thread. Figures are samples / wall-clock
seconds. Each engine runs on a quarter of the shards and on all of them: "overall" is the
full run including model loading and, for Ray, the dataset's start-up; "marginal" is the extra
samples over the extra seconds (the steady-state rate a long run approaches), "fixed cost"
the start-up the two points imply. The ratios are Ray / plain. A first Ray run on one shard,
untimed, starts Ray's worker processes; actors (and their model loading) start in each run. The local Ray instance declares 4 logical CPUs so that read tasks can run beside
the 2 actors; the machine's cores bound what the 2 workers can gain.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mars_data.curation import Recipe, curate
from mars_data.curation.pipeline import Selector, local_shards
from mars_data.curation.shards import read_shard, write_shard
from mars_data.curation.steps import ClipAesthetic, rows_to_batch
from mars_data.curation.tiny import save_random_clip
from mars_data.tars import member


def write_shards(root: Path, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                width, height = int(rng.integers(224, 400)), int(rng.integers(224, 400))
                grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(grid).resize((width, height), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"picture {key}".encode()),
                                  ("json", json.dumps({"key": key, "width": width, "height": height}).encode())):
                    info, data = member(f"{key}.{ext}", data)
                    tar.addfile(info, io.BytesIO(data))


def plain_loop(input: Path, output: Path, recipe: Recipe) -> int:
    """The pipeline's work in one process, shard after shard, no Ray."""
    sources = local_shards(input, output)
    output.mkdir(parents=True)
    selector = Selector(recipe, sources, set(), output)
    scorer = ClipAesthetic(recipe.clip, recipe.aesthetic) if recipe.clip.enabled else None
    for index, source in enumerate(sources):
        rows = read_shard({"shard": str(source), "shard_index": index}, recipe.size)
        if scorer is not None:
            batch = scorer(rows_to_batch(rows))
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        write_shard(str(source), str(output / source.name), selector.finalise(index, rows))
    return selector.samples_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point; the fastest counts")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        write_shards(tmp / "in", args.shards, args.samples_per_shard)
        clip_dir = save_random_clip(tmp / "clip", image_size=64, patch_size=16, hidden=64, projection_dim=64)
        off = {"enabled": False}
        workloads = {
            "size filter": Recipe.from_dict({"size": {"concurrency": 2}, "clip": off, "aesthetic": off, "recaption": off}),
            "size + CLIP": Recipe.from_dict({"size": {"concurrency": 2}, "aesthetic": off, "recaption": off,
                                             "clip": {"model": str(clip_dir), "batch_size": 50, "concurrency": 2}}),
        }
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        print(f"{args.shards} shards x {args.samples_per_shard} samples, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f} at start")
        shards = sorted((tmp / "in").glob("*.tar"))
        small = shards[:max(1, len(shards) // 4)]
        engines = {"plain loop": lambda shards, out, recipe: plain_loop(shards, out, recipe),
                   "Ray Data (2 workers)": lambda shards, out, recipe: curate(shards, out, recipe, progress=False)["samples"]["in"]}
        # Ray starts its worker processes on the first execution: warm them up outside the timings
        curate([str(p) for p in shards[:2]], tmp / "warm-up", workloads["size filter"], progress=False)
        for name, recipe in workloads.items():
            rates = {}
            for engine, run in engines.items():
                timings = []
                for part in (small, shards):  # two sizes: the difference removes start-up and model loading
                    best = math.inf
                    for repeat in range(args.repeats):  # the best of a few: other jobs share the machine
                        start = time.perf_counter()
                        n = run([str(p) for p in part], tmp / f"{engine}-{name}-{len(part)}-{repeat}", recipe)
                        best = min(best, time.perf_counter() - start)
                    timings.append((n, best))
                (n1, t1), (n2, t2) = timings
                rates[engine] = (n2 / t2, (n2 - n1) / (t2 - t1), t1 - n1 * (t2 - t1) / (n2 - n1))
                print(f"{name:12s} {engine:21s}: {n2 / t2:7.1f} samples/s overall ({n2} in {t2:5.1f} s), "
                      f"{rates[engine][1]:7.1f} samples/s marginal, {rates[engine][2]:5.1f} s fixed cost")
            (plain_all, plain_marginal, _), (ray_all, ray_marginal, _) = rates.values()
            print(f"{name:12s} ratio Ray / plain: overall {ray_all / plain_all:.2f}, marginal {ray_marginal / plain_marginal:.2f}")
        ray.shutdown()
        print(f"load {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()

"""Shapes-world shard writing speed, in samples per second, with 1 and 2 processes.

    python benchmarks/shard_writing.py [--num-samples 4000] [--size 64] [--samples-per-shard 250]

Each run writes fresh shards (render, PNG encode, tar) into a temporary directory, the way
``python -m mars_data.shapes shards`` does; the figure is samples / wall-clock seconds,
process start-up included. On a shared machine, other jobs lower the 2-process figure most.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mars_data.shapes import write_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--aspect-ratios", default="1:1")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    args = parser.parse_args()

    print(f"{args.num_samples} samples at size {args.size} ({args.aspect_ratios}), "
          f"{args.samples_per_shard} per shard, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    for processes in (int(p) for p in args.processes.split(",")):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_shards(out, args.num_samples, seed=0, size=args.size, aspect_ratios=tuple(args.aspect_ratios.split(",")),
                         samples_per_shard=args.samples_per_shard, processes=processes, progress=False)
            seconds = time.perf_counter() - start
        print(f"processes={processes}: {args.num_samples / seconds:8.0f} samples/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()

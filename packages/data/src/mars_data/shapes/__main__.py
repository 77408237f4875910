"""Command line of the shapes world.

    python -m mars_data.shapes shards --out DIR --num-samples N --seed S [--size 64 | --size 64,128] [--lowres 64]
        [--aspect-ratios 1:1,3:2,2:3,2:1,1:2] [--lang en,zh] [--samples-per-shard K]
        [--processes P] [--stream train|val] [--jitter J]
    python -m mars_data.shapes prompts --num N --seed S --out FILE.jsonl
    python -m mars_data.shapes render --prompts FILE.jsonl --out DIR [--size 64]
        (the scenes of a prompt file as DIR/00000.png, 00001.png, ... in row order: held-out
        images, e.g. to caption)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mars_data.shapes.captions import LANGS
from mars_data.shapes.shards import read_prompts, write_prompts, write_shards
from mars_data.shapes.world import render


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _sizes(text: str) -> int | list[int]:
    sizes = [int(x) for x in _csv(text)]
    return sizes[0] if len(sizes) == 1 else sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mars_data.shapes", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("shards", help="write webdataset shards of rendered scenes")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--num-samples", type=int, required=True)
    shards.add_argument("--seed", type=int, required=True)
    shards.add_argument("--size", type=_sizes, default=64,
                        help="short side of the canvas in pixels; comma-separated: each sample draws one (64,128)")
    shards.add_argument("--aspect-ratios", type=_csv, default=("1:1",), help="comma-separated W:H")
    shards.add_argument("--lang", type=_csv, default=LANGS, help="comma-separated caption languages")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--processes", type=int, default=None, help="default: one per CPU")
    shards.add_argument("--stream", choices=("train", "val"), default="train", help="random stream")
    shards.add_argument("--jitter", type=float, default=0.0, help="position jitter of pairs (<= 0.05)")
    shards.add_argument("--lowres", type=int, default=None,
                        help="also render each scene at this short side, as <key>.lowres.png (super-resolution triplets)")

    prompts = commands.add_parser("prompts", help="write an evaluation prompt file (JSON Lines)")
    prompts.add_argument("--num", type=int, required=True)
    prompts.add_argument("--seed", type=int, required=True)
    prompts.add_argument("--out", required=True)

    scenes = commands.add_parser("render", help="draw the scenes of a prompt file as numbered PNGs")
    scenes.add_argument("--prompts", required=True)
    scenes.add_argument("--out", required=True, help="output directory")
    scenes.add_argument("--size", type=int, default=64)

    args = parser.parse_args(argv)
    if args.command == "shards":
        paths = write_shards(
            args.out,
            args.num_samples,
            args.seed,
            size=args.size,
            aspect_ratios=args.aspect_ratios,
            langs=args.lang,
            samples_per_shard=args.samples_per_shard,
            processes=args.processes,
            stream=args.stream,
            jitter=args.jitter,
            lowres=args.lowres,
        )
        print(f"wrote {args.num_samples} samples in {len(paths)} shards to {args.out}", file=sys.stderr)
    elif args.command == "prompts":
        write_prompts(args.out, args.num, args.seed)
        print(f"wrote {args.num} prompts to {args.out}", file=sys.stderr)
    else:
        records = read_prompts(args.prompts)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for index, record in enumerate(records):
            render(record["scene"], args.size).save(out / f"{index:05d}.png")
        print(f"drew {len(records)} scenes of {args.prompts} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

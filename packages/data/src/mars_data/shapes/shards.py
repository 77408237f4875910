"""The shapes world on disk: webdataset shards for training, prompt files for evaluation.

Seed convention: every random stream is a ``random.Random`` seeded with a string that names
its purpose: ``"mars-shapes/<stream>/<seed>/<shard>"`` for shards (streams ``train`` and
``val``) and ``"mars-shapes/eval/<seed>"`` for prompt files. Training data, validation data
and evaluation prompts therefore never share a stream, whatever integer seeds are chosen,
and a shard's content depends only on its stream, seed, index and the world parameters, not
on how many processes wrote it.

A shard ``shapes-000000.tar`` holds, per sample ``<key>``: ``<key>.png`` (the image),
``<key>.txt`` (the caption, UTF-8) and ``<key>.json`` (the scene record plus ``width`` and
``height``); with ``lowres`` also ``<key>.lowres.png``, the same scene rendered at the
short side ``lowres`` (super-resolution triplets: the low-res image as a base model trained on
renders draws it, not the high-res one resized down). Shards are written to a temporary name and renamed when complete, so a shard
that exists is whole.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import tarfile
from functools import partial
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mars_core.io import atomic_path, write_text_atomic
from mars_data.shapes.captions import LANGS, write_caption
from mars_data.shapes.world import render, sample_scene
from mars_data.tars import write_manifest

SHARD_PATTERN = "shapes-{index:06d}.tar"
LOWRES_MEMBER = "lowres.png"  # write_shards(lowres=...): the scene at the low-res size


def aspect_size(size: int, ratio: str) -> tuple[int, int]:
    """(width, height) of a canvas with aspect ratio ``"W:H"`` whose short side is ``size``."""
    w, h = (float(x) for x in ratio.split(":"))
    if w <= 0 or h <= 0:
        raise ValueError(f"bad aspect ratio {ratio!r}")
    if w >= h:
        return round(size * w / h), size
    return size, round(size * h / w)


def sample_record(
    rng: random.Random,
    *,
    langs: tuple[str, ...] = LANGS,
    num_objects: int | None = None,
    size: int | Sequence[int] | None = None,
    aspect_ratios: tuple[str, ...] = ("1:1",),
    jitter: float = 0.0,
) -> dict:
    """A scene record ``{"prompt", "lang", "scene"}``, plus ``width`` and ``height`` if ``size``
    (the short side, or a list of them to draw from: a tokenizer that serves two sizes)."""
    scene = sample_scene(rng, num_objects, jitter=jitter)
    lang = rng.choice(langs)
    record = {"prompt": write_caption(scene, lang, rng), "lang": lang, "scene": scene}
    if size is not None:
        sizes = [size] if isinstance(size, int) else list(size)
        short = sizes[0] if len(sizes) == 1 else rng.choice(sizes)  # one size: the streams of before
        record["width"], record["height"] = aspect_size(short, rng.choice(aspect_ratios))
    return record


def shard_records(
    seed: int,
    shard: int,
    count: int,
    *,
    stream: str = "train",
    size: int | Sequence[int] = 64,
    aspect_ratios: tuple[str, ...] = ("1:1",),
    langs: tuple[str, ...] = LANGS,
    jitter: float = 0.0,
) -> list[dict]:
    """The records of one shard, exactly as ``write_shards`` writes them (without rendering)."""
    rng = random.Random(f"mars-shapes/{stream}/{seed}/{shard}")
    return [
        sample_record(rng, langs=langs, size=size, aspect_ratios=aspect_ratios, jitter=jitter)
        for _ in range(count)
    ]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for identical parameters
    tar.addfile(info, io.BytesIO(data))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(shard: int, *, out: Path, num_samples: int, samples_per_shard: int, seed: int, lowres: int | None = None, **world) -> int:
    start = shard * samples_per_shard
    count = min(samples_per_shard, num_samples - start)
    path = out / SHARD_PATTERN.format(index=shard)
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, record in enumerate(shard_records(seed, shard, count, **world)):
            key = f"{start + i:09d}"
            width, height = record["width"], record["height"]
            _add_member(tar, f"{key}.png", _png(render(record["scene"], width, height)))
            if lowres:
                scale = lowres / min(width, height)
                _add_member(tar, f"{key}.{LOWRES_MEMBER}", _png(render(record["scene"], round(width * scale), round(height * scale))))
            _add_member(tar, f"{key}.txt", record["prompt"].encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
    return count


def write_shards(
    out: str | Path,
    num_samples: int,
    seed: int,
    *,
    size: int | Sequence[int] = 64,
    aspect_ratios: tuple[str, ...] = ("1:1",),
    langs: tuple[str, ...] = LANGS,
    samples_per_shard: int = 1000,
    stream: str = "train",
    jitter: float = 0.0,
    lowres: int | None = None,
    processes: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``num_samples`` samples as shards ``out/shapes-000000.tar``, ...; returns their paths.
    ``lowres``: also each scene rendered at this short side (``<key>.lowres.png``).

    Shards are written in parallel by ``processes`` worker processes (default: one per CPU,
    at most one per shard); ``processes=1`` writes in this process.
    """
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(num_samples / samples_per_shard)
    processes = min(processes or os.cpu_count() or 1, num_shards)
    job = partial(
        _write_shard,
        out=out,
        num_samples=num_samples,
        samples_per_shard=samples_per_shard,
        seed=seed,
        stream=stream,
        size=size,
        aspect_ratios=tuple(aspect_ratios),
        langs=tuple(langs),
        jitter=jitter,
        lowres=lowres,
    )
    with tqdm(total=num_samples, unit="sample", desc=f"shapes shards -> {out}", disable=not progress) as bar:
        if processes == 1:
            counts = {shard: job(shard) for shard in range(num_shards)}
            bar.update(sum(counts.values()))
        else:
            counts = {}
            # spawn, not fork: a process forked while another thread holds a lock (a progress
            # bar's monitor, a server, torch's pools) can wait on that lock for ever; a test run
            # hung so (docs/LOG.md, session 29). The workers pay one import (about 1.7 s).
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                for shard, count in pool.imap_unordered(partial(_numbered, job), range(num_shards)):
                    counts[shard] = count
                    bar.update(count)
    paths = [out / SHARD_PATTERN.format(index=i) for i in range(num_shards)]
    write_manifest(out, {path.name: counts[i] for i, path in enumerate(paths)})
    return paths


def _numbered(job, shard: int) -> tuple[int, int]:
    return shard, job(shard)


def eval_rng(seed: int) -> random.Random:
    """The random stream of evaluation prompt files (disjoint from every shard stream)."""
    return random.Random(f"mars-shapes/eval/{seed}")


def heldout_records(num: int, seed: int) -> list[dict]:
    """Held-out scene records (what ``write_prompts`` writes).

    Rows cycle through (1 object, en), (2 objects, en), (1 object, zh), (2 objects, zh), so any
    prefix of a multiple of 4 rows is balanced: half one-object, half two-object, half en, half
    zh. Scenes use the world's exact layout (no jitter); caption forms are random.
    """
    rng = eval_rng(seed)
    return [sample_record(rng, langs=(("en", "zh")[(i // 2) % 2],), num_objects=1 + i % 2) for i in range(num)]


def write_prompts(out: str | Path, num: int, seed: int) -> list[dict]:
    """Write a prompt file (JSON Lines of ``heldout_records``) and return its records."""
    records = heldout_records(num, seed)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def read_prompts(path: str | Path) -> list[dict]:
    """The records of a prompt file, in row order (blank lines skipped); each row needs a
    non-empty ``prompt``. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path}:{number}: a row needs a non-empty "prompt" string, got {line.strip()[:80]}')
        records.append(record)
    if not records:
        raise ValueError(f"prompt file {path} has no prompts")
    return records

"""Reading webdataset shards: URL expansion, robust sample decoding, size-bucketed batches.

A sample is the group of tar members sharing a key. Two layouts are read:
- shapes-world shards (``png``, ``txt``, ``json`` with the scene record),
- img2dataset shards (``jpg`` or ``png``, ``txt``, ``json`` with url, width, height, ...),
either of them with a ``codes.npy`` member added by pre-tokenization (an integer array h x w),
and optionally further code members ``<name>.codes.npy`` (``extra_codes``; e.g. the low-res
codes of super-resolution triplets) read into ``<name>_codes``.

Broken data never stops training, and never hangs it: a shard that is missing, cannot be
read, holds no sample or fewer samples than its manifest (``mars_data.tars.write_manifest``)
says (a truncated tar), a member that cannot be decoded or a sample lacking what was asked
for is skipped and counted per shard and per reason (``SkipCounter``, shared by the
DataLoader workers, logged as a warning carrying the count so far). When ``max_failures``
attempts in a row give no usable sample (an all-bad data set would otherwise loop through
empty epochs forever), reading stops with a ``DataError`` naming the shards and the reasons.

Training order is reproducible and resumable (``mars_core.resume``): shards and samples are
shuffled by generators seeded from (seed, epoch, rank, worker), and a resumed epoch skips the
batches the interrupted run already trained on.

Batches are dicts: ``image`` FloatTensor[B, 3, H, W] in [-1, 1], ``codes`` LongTensor[B, h, w],
``caption`` list[str], ``record`` list[dict] (the sample's json), ``key`` and ``url`` list[str]. All
tensors of a batch have the same size: samples are grouped into per-size buckets and a batch
is emitted when its bucket is full (the remainders at the end of a pass come out as smaller
batches), so shards of mixed aspect ratios train without padding.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from glob import glob
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import webdataset as wds

from mars_core.resume import StreamPosition, worker_info, worker_share
from mars_data.images import ImageError, load_image, prepare_image
from mars_data.tars import expected_samples

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
CODES_KEY = "codes.npy"


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a directory (its ``*.tar``), a brace pattern (``a-{000..009}.tar``), a
    local path or a URL webdataset opens (``https://``, ``pipe:``, ...), or a list of these.
    Local paths must exist."""
    if isinstance(spec, (str, Path)):
        spec = [str(spec)]
    urls: list[str] = []
    for item in spec:
        item = str(item)
        if Path(item).is_dir():
            found = sorted(glob(str(Path(item) / "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in directory {item}")
            urls.extend(found)
            continue
        for url in braceexpand.braceexpand(item):
            if not urlparse(url).scheme and not Path(url).is_file():  # a local path
                raise FileNotFoundError(f"shard {url} does not exist")
            urls.append(url)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def is_not_an_image(name: str) -> bool:
    """Member filter for code-only reading: image members are not even read from the tar."""
    return name.rsplit(".", 1)[-1].lower() not in IMAGE_KEYS


class DataError(RuntimeError):
    """The data yields no usable sample: the message names the shards and why."""


class Skip(ValueError):
    """A sample that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Skips per shard and per reason, shared by the DataLoader worker processes.

    The counts live in shared memory created before the workers start (one row per shard of
    ``urls``, one column per reason of ``REASONS``). ``streak`` counts attempts in a row that
    gave no usable sample, over all workers; a usable sample resets it. At ``max_failures``
    the next skip raises ``DataError``.
    """

    REASONS = (
        "missing_shard",  # the shard file is gone (e.g. deleted mid-run)
        "unreadable_shard",  # not a tar, or a read error
        "truncated_shard",  # fewer samples than its manifest: the missing samples are counted
        "empty_shard",  # no sample at all
        "bad_image",  # undecodable, truncated or a decompression bomb (mars_data.images)
        "bad_codes",  # codes.npy unreadable or not a 2-d integer grid
        "missing_member",  # no caption, image or codes member where one was asked for
        "untrained_size",  # codes of a grid that is not one of the model's resolutions
        "small_image",  # smaller than the random crop asked for
        "bad_sample",  # anything else
    )
    LOGGED_PER_REASON = 10

    def __init__(self, urls: Sequence[str], max_failures: int = 1000):
        self.urls = list(urls)
        self.max_failures = max_failures
        context = multiprocessing.get_context()
        self._counts = context.Array("q", len(self.urls) * len(self.REASONS))
        self._streak = context.Value("q", 0)

    @property
    def count(self) -> int:
        return sum(self._counts[:])

    def by_reason(self) -> dict[str, int]:
        n = len(self.REASONS)
        return {reason: sum(self._counts[i::n]) for i, reason in enumerate(self.REASONS)}

    def by_shard(self) -> dict[str, dict[str, int]]:
        n, counts = len(self.REASONS), self._counts[:]
        rows = {url: dict(zip(self.REASONS, counts[i * n : (i + 1) * n])) for i, url in enumerate(self.urls)}
        return {url: {r: c for r, c in row.items() if c} for url, row in rows.items() if any(row.values())}

    def ok(self) -> None:
        if self._streak.value:
            self._streak.value = 0

    def skip(self, url: str, reason: str, message: str, count: int = 1) -> None:
        row = self.urls.index(url) if url in self.urls else 0
        column = self.REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[row * len(self.REASONS) + column] += count
            total = sum(self._counts[:])
            of_reason = sum(self._counts[column :: len(self.REASONS)])
        with self._streak.get_lock():
            self._streak.value += 1
            streak = self._streak.value
        # Every skip is counted (SkipMetrics logs them); the log gets a reason's first ones and then
        # one line per power of ten, since a run that trains on some of the shards' sizes skips
        # the others by design, hundreds of thousands of times.
        if of_reason <= self.LOGGED_PER_REASON or len(str(of_reason)) > len(str(of_reason - count)):
            log.warning("skipped %s (%s: %s); %d skipped so far, %d for %s", url, reason, message, total, of_reason, reason)
        if streak >= self.max_failures:
            shards = "; ".join(
                f"{url}: " + ", ".join(f"{r} {c}" for r, c in row.items())
                for url, row in list(self.by_shard().items())[:10]
            )
            raise DataError(
                f"{streak} attempts in a row gave no usable sample: the data set has nothing to train on. "
                f"Skips by shard: {shards}"
            )


def shard_reason(exn: BaseException) -> str:
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    return "unreadable_shard"


class ShardReader:
    """Pipeline stage: shard URLs -> raw samples, counting each shard's samples against its
    manifest (``mars_data.tars.expected_samples``); every shard failure is a counted skip."""

    def __init__(self, skips: SkipCounter, select_files=None):
        self.skips = skips
        self.select_files = select_files

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url, read, failed = shard["url"], 0, []

            def handler(exn: BaseException, url=url) -> bool:
                failed.append(exn)
                self.skips.skip(url, shard_reason(exn), f"{type(exn).__name__}: {exn}")
                return True

            for sample in wds.tariterators.tarfile_samples(iter([dict(shard)]), handler=handler, select_files=self.select_files):
                read += 1
                yield sample
            expected = expected_samples(url)
            if failed and read == 0:  # missing or unreadable: counted once, by the handler
                continue
            if expected is not None and read < expected:
                self.skips.skip(url, "truncated_shard", f"{read} of the {expected} samples its manifest lists", expected - read)
            elif read == 0 and not failed:
                self.skips.skip(url, "empty_shard", "no samples")


class SeededShuffle:
    """Pipeline stage: webdataset's buffer shuffle, drawing from this epoch's seeded generator."""

    def __init__(self, position: StreamPosition, name: str, bufsize: int, initial: int):
        self.position, self.name, self.bufsize, self.initial = position, name, bufsize, initial

    def __call__(self, items: Iterable) -> Iterator:
        yield from wds.shuffle(self.bufsize, self.initial, rng=self.position.rng(self.name))(items)


class SeededShards:
    """Pipeline source: shards drawn at random with replacement, forever, from this epoch's
    seeded generator (each worker and rank its own stream)."""

    def __init__(self, urls: Sequence[str], position: StreamPosition):
        self.urls, self.position = list(urls), position

    def __call__(self) -> Iterator[dict]:
        rng = self.position.rng("resampled")
        while True:
            yield {"url": rng.choice(self.urls)}


class SkipResumed:
    """Pipeline stage (last): drop the batches of this worker that the interrupted run already
    trained on (``StreamPosition.skip``: batches of the DataLoader, taken from workers in turn)."""

    def __init__(self, position: StreamPosition):
        self.position = position

    def __call__(self, batches: Iterable) -> Iterator:
        _, _, worker, num_workers = worker_info()
        yield from islice(batches, worker_share(self.position.skip(), worker, num_workers), None)


class RandomCrop:
    """Pipeline stage: a random ``size`` x ``size`` window of each image, drawn from this
    epoch's seeded generator (a tokenizer sees large renders at their own scale for the cost of
    small ones); an image smaller than the window is skipped."""

    def __init__(self, size: int, position: StreamPosition, skips: SkipCounter):
        self.size, self.position, self.skips = size, position, skips

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        rng = self.position.rng("crops")
        for sample in samples:
            height, width = sample["image"].shape[-2:]
            if height < self.size or width < self.size:
                self.skips.skip(sample["url"], "small_image", f"sample {sample['key']}: {width}x{height} < crop {self.size}")
                continue
            top, left = rng.randint(0, height - self.size), rng.randint(0, width - self.size)
            yield {**sample, "image": sample["image"][:, top : top + self.size, left : left + self.size]}


def decode_image(data: bytes, resolutions: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Image bytes -> FloatTensor[3, H, W] in [-1, 1]; with ``resolutions`` (width, height) the
    image is fitted to the nearest of them (``mars_data.images.prepare_image``)."""
    image = load_image(data)  # decoded now: truncated, corrupt or oversized data raises here, not later
    if resolutions:
        image = prepare_image(image, resolutions)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def decode_codes(data: bytes) -> torch.Tensor:
    """``codes.npy`` bytes -> LongTensor[h, w]."""
    codes = np.load(io.BytesIO(data), allow_pickle=False)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-d integer array, got {codes.dtype} {codes.shape}")
    return torch.from_numpy(codes.astype(np.int64))


class SampleDecoder:
    """Pipeline stage: raw tar samples -> decoded samples; a sample that fails is skipped."""

    def __init__(
        self,
        skips: SkipCounter,
        load_images: bool,
        load_codes: bool,
        resolutions: Sequence[tuple[int, int]] | None,
        extra_codes: Sequence[str] = (),
    ):
        self.skips = skips
        self.load_images = load_images
        self.load_codes = load_codes
        self.resolutions = resolutions
        self.extra_codes = tuple(extra_codes)

    def decode(self, sample: dict) -> dict:
        record = json.loads(sample["json"]) if "json" in sample else {}
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        else:
            caption = record.get("prompt") or record.get("caption")
        if caption is None:
            raise Skip("missing_member", "no caption (txt member, or prompt/caption in json)")
        out = {"key": sample["__key__"], "url": sample.get("__url__"), "caption": caption, "record": record}
        if self.load_images:
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            if image_key is None:
                raise Skip("missing_member", f"no image member ({', '.join(IMAGE_KEYS)})")
            try:
                out["image"] = decode_image(sample[image_key], self.resolutions)
            except ImageError as exn:
                raise Skip("bad_image", str(exn)) from exn
        if self.load_codes:
            if CODES_KEY not in sample:
                raise Skip("missing_member", f"no {CODES_KEY} member")
            try:
                out["codes"] = decode_codes(sample[CODES_KEY])
            except ValueError as exn:
                raise Skip("bad_codes", str(exn)) from exn
        for name in self.extra_codes:
            if f"{name}.{CODES_KEY}" not in sample:
                raise Skip("missing_member", f"no {name}.{CODES_KEY} member")
            try:
                out[f"{name}_codes"] = decode_codes(sample[f"{name}.{CODES_KEY}"])
            except ValueError as exn:
                raise Skip("bad_codes", str(exn)) from exn
        return out

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                decoded = self.decode(sample)
            except Exception as exn:  # any broken sample is skipped; training goes on
                reason = exn.reason if isinstance(exn, Skip) else "bad_sample"
                message = f"sample {sample.get('__key__')}: {type(exn).__name__}: {exn}"
                self.skips.skip(sample.get("__url__"), reason, message)
                continue
            self.skips.ok()
            yield decoded


def collate(samples: list[dict]) -> dict:
    batch = {name: [s[name] for s in samples] for name in ("key", "url", "caption", "record")}
    for name, value in samples[0].items():
        if isinstance(value, torch.Tensor):  # image, codes and any extra codes
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class BucketBatcher:
    """Pipeline stage: batches of ``batch_size`` samples of equal image and code sizes."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    @staticmethod
    def bucket(sample: dict) -> tuple:
        return tuple((name, tuple(value.shape)) for name, value in sample.items() if isinstance(value, torch.Tensor))

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        buckets: dict[tuple, list[dict]] = {}
        for sample in samples:
            bucket = buckets.setdefault(self.bucket(sample), [])
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                yield collate(bucket)


def shard_pipeline(
    urls: list[str],
    *,
    batch_size: int,
    skips: SkipCounter,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    batches_per_worker: int | None = None,
    load_images: bool = True,
    load_codes: bool = False,
    resolutions: Sequence[tuple[int, int]] | None = None,
    position: StreamPosition | None = None,
    batch_stage=None,
    extra_codes: Sequence[str] = (),
    crop: int | None = None,
) -> wds.DataPipeline:
    """The iterable of batches over ``urls``.

    Without ``resampled`` each node and DataLoader worker reads its own share of the shards
    once per pass (shuffled when ``shuffle_buffer`` > 0). With ``resampled`` every worker draws
    shards at random, forever; ``batches_per_worker`` then ends each epoch. Every random draw
    comes from ``position`` (seed and epoch; a fresh ``StreamPosition(0)`` if not given), and a
    resumed epoch starts after the batches ``position`` says were trained on. ``batch_stage``
    (``stage(batches, skips, rng) -> batches``, its draws from ``position``) runs in the
    DataLoader workers before the resumed epoch's skip, so a resumed run draws what the first
    run drew: training modules build their sequences there (``mars_semvie.sequences.SequenceBuilder``).
    """
    position = position or StreamPosition(0)
    stages: list = [SeededShards(urls, position) if resampled else wds.SimpleShardList(urls)]
    if not resampled:
        stages += [wds.split_by_node, wds.split_by_worker]
        if shuffle_buffer > 0:
            stages.append(SeededShuffle(position, "shards", len(urls), len(urls)))
    stages.append(ShardReader(skips, select_files=None if load_images else is_not_an_image))
    if shuffle_buffer > 0:
        stages.append(SeededShuffle(position, "samples", shuffle_buffer, min(shuffle_buffer, 100)))
    stages.append(SampleDecoder(skips, load_images, load_codes, resolutions, extra_codes))
    if crop is not None:
        if not load_images or load_codes:
            raise ValueError("crop cuts images: it needs load_images and no codes (they would no longer match)")
        stages.append(RandomCrop(crop, position, skips))
    stages.append(BucketBatcher(batch_size))
    if batch_stage is not None:
        stages.append(lambda batches: batch_stage(batches, skips, position.rng("sequences")))
    pipeline = wds.DataPipeline(*stages)
    if batches_per_worker is not None:
        pipeline = pipeline.with_epoch(batches_per_worker)
    # after with_epoch: the skipped batches belong to the resumed epoch's count
    return wds.DataPipeline(pipeline, SkipResumed(position))

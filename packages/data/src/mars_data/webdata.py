"""Reading webdataset shards: URL expansion, robust sample decoding, size-bucketed batches.

A sample is the group of tar members sharing a key. Two layouts are read:
- shapes-world shards (``png``, ``txt``, ``json`` with the scene record),
- img2dataset shards (``jpg`` or ``png``, ``txt``, ``json`` with url, width, height, ...),
either of them with a ``codes.npy`` member added by pre-tokenization (an integer array h x w),
and optionally further code members ``<name>.codes.npy`` (``extra_codes``; e.g. the low-res
codes of super-resolution triplets) read into ``<name>_codes``.

Broken data never stops training: a tar that cannot be read, a member that cannot be decoded
or a sample lacking what was asked for is skipped, counted (across DataLoader workers) and
logged as a warning carrying the count so far.

Batches are dicts: ``image`` FloatTensor[B, 3, H, W] in [-1, 1], ``codes`` LongTensor[B, h, w],
``caption`` list[str], ``record`` list[dict] (the sample's json), ``key`` list[str]. All
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
from glob import glob
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mars_data.images import load_image

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


class SkipCounter:
    """Counts and logs skipped data; the count is shared by the DataLoader worker processes."""

    def __init__(self) -> None:
        self._count = multiprocessing.get_context().Value("q", 0)

    @property
    def count(self) -> int:
        return self._count.value

    def skip(self, what: str, reason: BaseException | str) -> None:
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        log.warning("skipped %s (%s); %d skipped so far", what, reason, count)

    def handler(self, exn: BaseException) -> bool:
        """webdataset exception handler: count the error, keep going."""
        self.skip("unreadable shard data", f"{type(exn).__name__}: {exn}")
        return True


def decode_image(data: bytes, image_size: int | None = None) -> torch.Tensor:
    """Image bytes -> FloatTensor[3, H, W] in [-1, 1]; with ``image_size`` the short side is
    resized to it and the centre square cropped."""
    image = load_image(data)  # decoded now: truncated, corrupt or oversized data raises here, not later
    if image_size is not None:
        w, h = image.size
        scale = image_size / min(w, h)
        w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
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
        self, skips: SkipCounter, load_images: bool, load_codes: bool, image_size: int | None, extra_codes: Sequence[str] = ()
    ):
        self.skips = skips
        self.load_images = load_images
        self.load_codes = load_codes
        self.image_size = image_size
        self.extra_codes = tuple(extra_codes)

    def decode(self, sample: dict) -> dict:
        record = json.loads(sample["json"]) if "json" in sample else {}
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        else:
            caption = record.get("prompt") or record.get("caption")
        if caption is None:
            raise ValueError("no caption (txt member, or prompt/caption in json)")
        out = {"key": sample["__key__"], "caption": caption, "record": record}
        if self.load_images:
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            if image_key is None:
                raise ValueError(f"no image member ({', '.join(IMAGE_KEYS)})")
            out["image"] = decode_image(sample[image_key], self.image_size)
        if self.load_codes:
            if CODES_KEY not in sample:
                raise ValueError(f"no {CODES_KEY} member")
            out["codes"] = decode_codes(sample[CODES_KEY])
        for name in self.extra_codes:
            if f"{name}.{CODES_KEY}" not in sample:
                raise ValueError(f"no {name}.{CODES_KEY} member")
            out[f"{name}_codes"] = decode_codes(sample[f"{name}.{CODES_KEY}"])
        return out

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except Exception as exn:  # any broken sample is skipped; training goes on
                what = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
                self.skips.skip(what, f"{type(exn).__name__}: {exn}")


def collate(samples: list[dict]) -> dict:
    batch = {name: [s[name] for s in samples] for name in ("key", "caption", "record")}
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
    image_size: int | None = None,
    extra_codes: Sequence[str] = (),
) -> wds.DataPipeline:
    """The iterable of batches over ``urls``.

    Without ``resampled`` each node and DataLoader worker reads its own share of the shards
    once per pass (shuffled when ``shuffle_buffer`` > 0). With ``resampled`` every worker draws
    shards at random, forever; ``batches_per_worker`` then ends each epoch.
    """
    stages: list = [wds.ResampledShards(urls) if resampled else wds.SimpleShardList(urls)]
    if not resampled:
        stages += [wds.split_by_node, wds.split_by_worker]
        if shuffle_buffer > 0:
            stages.append(wds.shuffle(len(urls), initial=len(urls)))
    select_files = None if load_images else is_not_an_image
    stages.append(wds.tarfile_to_samples(handler=skips.handler, select_files=select_files))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100)))
    stages += [SampleDecoder(skips, load_images, load_codes, image_size, extra_codes), BucketBatcher(batch_size)]
    pipeline = wds.DataPipeline(*stages)
    if batches_per_worker is not None:
        pipeline = pipeline.with_epoch(batches_per_worker)
    return pipeline

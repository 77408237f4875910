"""Reading input shards into pipeline rows, and writing a curated output shard.

Input shards are in the img2dataset layout (``<key>.jpg|png|webp``, ``<key>.txt``,
``<key>.json``), read with ``mars_data.tars.read_samples``. Each sample becomes one row; its
image is decoded once here with ``mars_data.images.load_image`` (corrupt, truncated and
decompression-bomb images are dropped with the reader's message as the reason), then the size
filter runs. Rows of dropped samples keep their metadata but lose their image bytes, so they
cost nothing downstream and still tell the driver that the shard's rows have all arrived: every
row carries ``shard_size``, the number of rows its shard produced. A tar that cannot be read
(or read to its end) adds one marker row (empty key, ``drop="shard"``) after the samples read
before the error.

The output shard has the same file name as the input and holds the kept samples in input
order, every member's bytes as stored except the json (extended with a ``curation`` record)
and, when recaptioned, the txt (the new caption; the original stays in the json). It is
written with ``mars_core.io.atomic_path``: it exists complete or not at all, which is what a
rerun checks to skip it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from pathlib import Path

from mars_core.io import atomic_path
from mars_data.curation.recipe import SizeStep
from mars_data.images import ImageError, load_image
from mars_data.tars import member, read_samples, split_key
from mars_data.webdata import IMAGE_KEYS


def base_row(shard: str, shard_index: int, position: int, key: str) -> dict:
    """A row with every column of the pipeline (Ray Data needs one schema for all rows)."""
    return {"shard": shard, "shard_index": shard_index, "shard_size": 0, "position": position, "key": key,
            "image": b"", "caption": "", "drop": "", "reason": "", "width": 0, "height": 0,
            "aspect_ratio": math.nan, "sha256": "", "clip_score": math.nan, "aesthetic_score": math.nan,
            "new_caption": "", "time_read": 0.0}


def sample_row(row: dict, members: list, size: SizeStep) -> dict:
    """Fill ``row`` from a sample's members: caption, image facts, or why it is dropped."""
    by_ext = {split_key(info.name)[1].lower(): data for info, data in members}
    image = next((by_ext[ext] for ext in IMAGE_KEYS if ext in by_ext), None)
    where = f"{Path(row['shard']).name}:{row['key']}"
    record = {}
    if "json" in by_ext:
        try:
            record = json.loads(by_ext["json"])
        except ValueError as error:
            return {**row, "drop": "decode", "reason": f"{where}: json not readable ({error})"}
        if not isinstance(record, dict):
            return {**row, "drop": "decode", "reason": f"{where}: json is not an object"}
    if "txt" in by_ext:
        row["caption"] = by_ext["txt"].decode("utf-8", errors="replace")
    else:
        row["caption"] = str(record.get("caption") or record.get("prompt") or "")
    if image is None:
        return {**row, "drop": "decode", "reason": f"{where}: no image member"}
    try:
        width, height = load_image(image, what=where).size
    except ImageError as error:
        return {**row, "drop": "decode", "reason": str(error)}
    short, long = min(width, height), max(width, height)
    row.update(width=width, height=height, aspect_ratio=long / short, sha256=hashlib.sha256(image).hexdigest())
    if short < size.min_short_side:
        return {**row, "drop": "size", "reason": f"{where}: short side {short} < {size.min_short_side}"}
    if long / short > size.max_aspect_ratio:
        return {**row, "drop": "aspect_ratio", "reason": f"{where}: aspect ratio {long / short:.3f} > {size.max_aspect_ratio}"}
    return {**row, "image": image}


def read_shard(item: dict, size: SizeStep) -> list[dict]:
    """Ray Data ``flat_map`` function: a shard ``{"shard", "shard_index"}`` -> its rows."""
    shard, index = item["shard"], int(item["shard_index"])
    rows: list[dict] = []
    failure = None
    start = time.perf_counter()
    try:
        for key, members in read_samples(shard):
            rows.append(sample_row(base_row(shard, index, len(rows), key), members, size))
    except (OSError, tarfile.TarError, EOFError) as error:
        failure = f"{Path(shard).name}: unreadable after {len(rows)} samples ({type(error).__name__}: {error})"
    if failure or not rows:
        rows.append({**base_row(shard, index, len(rows), ""), "drop": "shard", "reason": failure or f"{Path(shard).name}: no samples"})
    per_row = (time.perf_counter() - start) / len(rows)
    for row in rows:
        row["shard_size"] = len(rows)
        row["time_read"] = per_row
    return rows


def write_shard(source: str, target: str, kept: dict[str, dict]) -> int:
    """Copy the samples of ``source`` whose key is in ``kept`` to ``target`` (atomically);
    ``kept[key]`` is the sample's ``curation`` record, with ``caption`` set when recaptioned.
    Returns the number of samples written. A source that cannot be read to its end (counted by
    ``read_shard``) is copied as far as it reads, as long as every kept sample was read."""
    written = 0
    with atomic_path(target) as tmp, tarfile.open(tmp, "w") as out:
        try:
            for key, members in read_samples(source) if kept else ():
                if key in kept:
                    for info, data in curated_members(key, members, kept[key]):
                        out.addfile(info, io.BytesIO(data))
                    written += 1
        except (OSError, tarfile.TarError, EOFError) as error:
            if written < len(kept):
                raise RuntimeError(f"{source}: unreadable before all {len(kept)} kept samples were copied: {error}") from error
    return written


def curated_members(key: str, members: list, curation: dict) -> list:
    """The sample's members with the json extended by ``curation`` and, when recaptioned, the new txt."""
    caption = curation.get("caption")
    out, has_json, has_txt = [], False, False
    for info, data in members:
        ext = split_key(info.name)[1].lower()
        if ext == "json":
            has_json = True
            info, data = member(info.name, _json_bytes({**json.loads(data), "curation": curation}))
        elif ext == "txt":
            has_txt = True
            if caption is not None:
                info, data = member(info.name, caption.encode())
        out.append((info, data))
    if not has_json:
        out.append(member(f"{key}.json", _json_bytes({"curation": curation})))
    if not has_txt and caption is not None:
        out.append(member(f"{key}.txt", caption.encode()))
    return out


def _json_bytes(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, sort_keys=True).encode()


def kept_hashes(shard: str | Path) -> set[str]:
    """The image hashes of a finished output shard (from its samples' ``curation`` records)."""
    hashes = set()
    for _, members in read_samples(shard):
        for info, data in members:
            if split_key(info.name)[1].lower() == "json":
                digest = json.loads(data).get("curation", {}).get("sha256")
                if digest:
                    hashes.add(digest)
    return hashes

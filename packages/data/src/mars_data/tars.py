"""Shard files as tar archives: the samples of a shard and members to add to one.

webdataset reads shards for training (``mars_data.webdata``); commands that copy shards and
add or drop members (pre-tokenization, curation, super-resolution triplets) read and write
them here, keeping every member's bytes as stored. Every writer records its shards' sample
counts in the directory's manifest (``write_manifest``), which readers check.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mars_core.io import atomic_path, write_json_atomic

MANIFEST = "shards.json"
Member = tuple[tarfile.TarInfo, bytes]


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: ``dir/abc.codes.npy`` -> (``dir/abc``, ``codes.npy``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def read_samples(path: str | Path) -> Iterator[tuple[str, list[Member]]]:
    """(key, [(member, data), ...]) for each sample of a tar, members in their stored order."""
    key, members = None, []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            this_key, _ = split_key(info.name)
            if this_key != key and members:
                yield key, members
                members = []
            key = this_key
            members.append((info, tar.extractfile(info).read()))
    if members:
        yield key, members


def write_samples(path: str | Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """Write ``{key: {extension: bytes}}`` as a shard (atomically: ``mars_core.io``)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info, data = member(f"{key}.{extension}", data)
                tar.addfile(info, io.BytesIO(data))
    return Path(path)


def member(name: str, data: bytes) -> Member:
    """A new regular-file member ``name`` holding ``data``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def npy_member(name: str, array: np.ndarray) -> Member:
    """An ``.npy`` member (no pickles: ``np.load(allow_pickle=False)`` reads it)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return member(name, buffer.getvalue())


def write_manifest(directory: str | Path, samples: dict[str, int]) -> Path:
    """Record how many samples each shard of ``directory`` holds (``{file name: samples}``) in
    its ``shards.json``, merged with what is there; readers compare (``expected_samples``), so
    a shard cut short, even at a member boundary where it still reads as a valid tar, is
    reported. Writers call it after their shards are complete."""
    path = Path(directory) / MANIFEST
    shards = json.loads(path.read_text())["shards"] if path.exists() else {}
    shards.update({name: {"samples": int(n)} for name, n in samples.items()})
    write_json_atomic(path, {"shards": dict(sorted(shards.items()))})
    return path


def expected_samples(url: str) -> int | None:
    """The sample count the manifest beside a local shard lists; None without one."""
    path = Path(url)
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text())["shards"].get(path.name)
    return None if entry is None else entry["samples"]

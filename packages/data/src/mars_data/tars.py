"""Shard files as tar archives: the samples of a shard and members to add to one.

webdataset reads shards for training (``mars_data.webdata``); commands that copy shards and
add or drop members (pre-tokenization, curation, super-resolution triplets) read and write
them here, keeping every member's bytes as stored.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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

"""Atomic file writing: a reader sees the old file or the complete new one, never a part.

The new content goes to a temporary file in the target's own directory (so the final
``os.replace`` is a rename on one filesystem, atomic on POSIX), is flushed and fsynced, then
renamed over the target; the directory is fsynced so the rename survives a power cut. On an
exception the temporary file is removed. A process killed mid-write leaves a ``.<name>.tmp-*``
file beside the target; ``remove_stale_temporaries`` clears them on the next start.

Checksums: saved models list the sha256 of each weights file in their JSON config
(``checksums``) and loaders check them (``verify_checksums``): a file changed, truncated or hit
by flipped bits is refused with an error naming it, instead of loading and drawing silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it in the block; it becomes ``path`` when
    the block ends without an exception (fsync, rename, fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries that killed writers left in ``directory`` (files, and directories
    of writers that build a whole tree under the same marker); returns them."""
    directory = Path(directory)
    stale = list(directory.glob(f".*{TMP_MARK}*")) if directory.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return stale


class ChecksumError(ValueError):
    """A file whose content is not what its manifest recorded."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(directory: str | Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` (paths relative to ``directory``)."""
    return {name: sha256_file(Path(directory) / name) for name in sorted(names)}


def verify_checksums(directory: str | Path, expected: dict[str, str], manifest: str | Path) -> None:
    """Raise ``ChecksumError`` naming the first file of ``expected`` that is missing or differs."""
    directory = Path(directory)
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing ({manifest} lists it)")
        if sha256_file(path) != digest:
            raise ChecksumError(
                f"{path} does not match the sha256 in {manifest}: the file was changed, truncated or "
                f"corrupted after it was saved; restore it from the original checkpoint"
            )

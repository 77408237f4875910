"""The one check of a path a user gives: a model, a checkpoint or data directory that must exist
before anything is loaded from it. Nothing downloads, so a wrong path would otherwise surface as
a loader's own error (transformers reads a missing directory as a hub repo id)."""

from __future__ import annotations

from pathlib import Path


def require_path(option: str, value: str | Path | None, what: str, *, directory: bool = True, hint: str = "") -> Path:
    """``value`` as an existing directory (a file when not ``directory``). Else a ValueError when it
    is unset and a FileNotFoundError when it is missing, each one line naming ``option`` and ``what``
    it must hold, with ``hint`` (e.g. where to get it) appended."""
    if value is None or str(value) in ("", "???"):
        raise ValueError(f"{option} is not set: give {what} ({option}=/path){hint}")
    path = Path(value).expanduser()
    if not (path.is_dir() if directory else path.is_file()):
        raise FileNotFoundError(f"{option}={value}: no such {'directory' if directory else 'file'} ({what}){hint}")
    return path

"""What every app does with bad input and failures: one line, the right exit code.

Design choices:
- An app's ``main`` runs its work through ``run_app``: an error prints one line to stderr,
  ``error: <message>`` (the messages name the file or option and what to do), and the process
  exits with 2 for bad input (a wrong option, a missing or corrupt file, a refused checkpoint)
  and 1 for any other failure. ``HYDRA_FULL_ERROR=1`` re-raises instead, with the traceback,
  as Hydra itself does. In a multirun the error is re-raised so Hydra records the failed job
  and the sweep goes on.
- Option types are checked before any model loads (``check_options``): each app declares its
  typed options as a dataclass and OmegaConf validates the values against it, so
  ``cfg_scale=abc`` is refused at once, naming the option, instead of failing later inside the
  model with an unrelated ``TypeError``. Only the declared options are checked, so options
  other apps add to the same config keep working.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded; the message names the file. (Defined
    here, not in ``mars_app.checkpointing``, so that an app that trains nothing imports no
    Lightning: 2.5-5 s of every evaluate and generate run.)"""


# errors that mean the input (options, files, checkpoints) is wrong, not the program
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError, MissingMandatoryValue)


class OptionError(ValueError):
    """An option whose value has the wrong type or form."""


def check_options(cfg: DictConfig, schema: type, config_file: str) -> None:
    """Validate the options of ``cfg`` that the dataclass ``schema`` declares against its
    field types; raise ``OptionError`` naming the first bad one."""
    typed = OmegaConf.structured(schema)
    for field in dataclasses.fields(schema):
        if field.name not in cfg:
            continue
        try:
            typed[field.name] = cfg[field.name]
        except ValidationError as err:
            expected = str(err).split("\n")[0]
            raise OptionError(
                f"{field.name}={cfg[field.name]!r} is not valid ({expected}); see {config_file}"
            ) from None


def one_line(error: BaseException) -> str:
    """The error's message on one line; for an error raised in a DataLoader worker (whose
    message carries the worker's traceback) the original error's line."""
    message = str(error).strip() or type(error).__name__
    lines = [line for line in message.splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        return lines[-1].strip()
    return " ".join(line.strip() for line in lines)


def root_error(error: BaseException) -> BaseException:
    """The error a config's ``_target_`` raised, out of Hydra's ``InstantiationException`` (which
    wraps it with ``raise ... from``): its message names the option, the wrapper's the class."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def run_app(work: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an app's work on its config; errors become one line and an exit code (above)."""
    try:
        return work(cfg)
    except Exception as raised:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
            raise
        error = root_error(raised)
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2 if isinstance(error, BAD_INPUT) else 1)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

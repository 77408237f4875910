"""Checkpoints that survive a kill and resume exactly; metrics that survive a resume.

Design choices:
- **Atomic files** (``AtomicCheckpointIO``): a checkpoint is written to a temporary file beside
  its target, fsynced and renamed (``mars_core.io.atomic_path``). Lightning's own writer moves a
  temporary file from the system's temp directory, a copy when that is another filesystem:
  a kill then left a 0-byte or partial ``last.ckpt``. ``Checkpoint`` removes the temporaries
  of killed writers when a run starts.
- **No code from checkpoints.** Every checkpoint is read with ``torch.load(weights_only=True)``;
  a file that needs more (a pickled object, i.e. code) is refused with an error naming it,
  whatever ``weights_only`` a caller passes. DeepSpeed directories: ``mars_app.strategies``.
- **last.ckpt is the newest.** ``Checkpoint`` writes ``last.ckpt`` before the step's top-k file,
  so a kill between the two saves leaves ``last.ckpt`` at the newer step, never the older one.
- **Exact resume.** What Lightning does not keep is added: ``RandomState`` stores the torch,
  numpy and Python generators and restores them right before the first batch of the resumed
  run (restoring earlier would let the loader's start-up draws shift them); the datamodules
  store their data position themselves (``mars_core.resume``), and modules their own extra
  state (e.g. the tokenizer's codebook usage).
- **Metrics appended.** ``CSVLogger`` keeps the rows a run directory already holds (Lightning's
  deletes them when a logger starts) and adds new columns by rewriting the header.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from mars_app.cli import CheckpointError
from mars_core.io import atomic_path, remove_stale_temporaries


def safe_load(path: str | Path, map_location: Any = None, allowed: list | tuple = ()) -> Any:
    """``torch.load`` that runs no code: tensors, containers and primitives only (and the
    classes in ``allowed``); anything else is refused with an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).split("\n")
        unsafe = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0])
        raise CheckpointError(
            f"{path} holds pickled objects beyond weights ({unsafe}); refused: loading it could run "
            f"code. Resume only from checkpoints this project wrote."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint files written atomically and read without unpickling code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location or (lambda storage, loc: storage))


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that clears killed writers' temporaries at start and writes
    ``last.ckpt`` first (see the module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temporaries(self.dirpath)
        self._last_saved_at = -1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # a run resumed in another directory (a copied run directory): Lightning forgets the old
        # last path and would write last-v1.ckpt beside the stale last.ckpt, which a later resume
        # from last.ckpt would then read; claim last.ckpt here so it stays the newest
        if not self.last_model_path and self.dirpath:
            self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        self._save_last_checkpoint(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if self._last_saved_at == trainer.global_step:  # already written first, this step
            return
        self._last_saved_at = trainer.global_step
        super()._save_last_checkpoint(trainer, monitor_candidates)


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        # numpy's and Python's states as tensors and ints: the checkpoint stays weights-only
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomState(L.Callback):
    """Stores the random generators in every checkpoint; a resumed run gets them back right
    before its first training batch, where the interrupted run had them."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        # rank 0 writes the checkpoint: every rank resumes with its generators (Lightning seeds
        # all ranks alike, so their streams agree unless a module draws per rank)
        return {"states": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["states"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the metrics file a run directory already holds."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = file.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger that appends to earlier metrics instead of deleting them."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

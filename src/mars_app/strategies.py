"""Training strategies.

Lightning's own ``DeepSpeedStrategy`` refuses to start unless the accelerator is CUDA. The
paper trains with DeepSpeed ZeRO-3 on GPUs, and we want the very same strategy (same config,
same checkpoint layout) to run on CPU so that tests and laptop runs exercise it. DeepSpeed
itself has a CPU accelerator and gloo process groups; only Lightning's guard and its
device-index validation are in the way, so :class:`DeepSpeedStrategy` skips those two on CPU
and changes nothing on GPU.

Checkpoints: ordinary ``.ckpt`` files are written atomically by
``mars_app.checkpointing.AtomicCheckpointIO``. A DeepSpeed checkpoint is a directory written
by every rank, so we write it under a temporary name (``mars_core.io``'s marker, so the next
run's ``remove_stale_temporaries`` clears one a kill left) and move it into place once all
ranks have finished: an interrupted save never leaves a half-written checkpoint under the
real name.

Loading: DeepSpeed's checkpoint engine unpickles with ``weights_only=False``, so a crafted
checkpoint directory would run its code on resume. While our strategy loads one, the engine
reads every file with ``mars_app.checkpointing.safe_load`` instead: weights, containers and
the two DeepSpeed classes its own checkpoints hold (an enum and the loss scaler's plain
attributes); anything else is refused with an error naming the file.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from mars_app.checkpointing import safe_load
from mars_core.io import TMP_MARK


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's own checkpoints pickle (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``); both hold data only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on CPU and saves atomically."""

    strategy_name = "mars_deepspeed"

    @property
    def _on_cpu(self) -> bool:
        return self.accelerator is not None and self.accelerator.__class__.__name__ == "CPUAccelerator"

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu:
            # DeepSpeed reads the rank's device index from root_device; CPU devices carry none.
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def setup_environment(self) -> None:
        if self._on_cpu:
            # Skip Lightning's CUDA-only guard; DeepSpeed picks its CPU accelerator itself.
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # CPU devices have no index, so Lightning's device-index validation does not apply.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.load_full_weights and self.zero_stage_3:  # one file: through AtomicCheckpointIO
            return super().load_checkpoint(checkpoint_path, weights_only)
        engine = self.deepspeed_engine.checkpoint_engine
        # an instance attribute shadows the engine's unsafe load for this call only
        engine.load = partial(safe_load, allowed=deepspeed_safe_globals())
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            del engine.load

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        filepath = Path(self.broadcast(str(filepath)))
        tmp = filepath.with_name(f".{filepath.name}{TMP_MARK}deepspeed")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        self.barrier("mars_deepspeed_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("mars_deepspeed_save_end")
        if self.is_global_zero:
            # not a temporary: a kill between the two renames leaves the previous checkpoint
            # only here, and the next start must not clear it
            old = filepath.with_name(f".{filepath.name}.previous")
            if filepath.exists():
                os.replace(filepath, old)
            os.replace(tmp, filepath)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            rank_zero_info(f"Saved DeepSpeed checkpoint to {filepath}")
        self.barrier("mars_deepspeed_save_done")

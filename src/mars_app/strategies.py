"""Training strategies.

Lightning's own ``DeepSpeedStrategy`` refuses to start unless the accelerator is CUDA. The
paper trains with DeepSpeed ZeRO-3 on GPUs, and we want the very same strategy (same config,
same checkpoint layout) to run on CPU so that tests and laptop runs exercise it. DeepSpeed
itself has a CPU accelerator and gloo process groups; only Lightning's guard and its
device-index validation are in the way, so :class:`DeepSpeedStrategy` skips those two on CPU
and changes nothing on GPU.

Checkpoints: Lightning writes ordinary ``.ckpt`` files atomically already (fsspec
transaction: temporary file, then move). A DeepSpeed checkpoint is a directory written by
every rank, so we write it under a temporary name and move it into place once all ranks
have finished: an interrupted save never leaves a half-written checkpoint under the real
name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info


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

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        filepath = Path(self.broadcast(str(filepath)))
        tmp = filepath.with_name(filepath.name + ".tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        self.barrier("mars_deepspeed_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("mars_deepspeed_save_end")
        if self.is_global_zero:
            old = filepath.with_name(filepath.name + ".old")
            if filepath.exists():
                os.replace(filepath, old)
            os.replace(tmp, filepath)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            rank_zero_info(f"Saved DeepSpeed checkpoint to {filepath}")
        self.barrier("mars_deepspeed_save_done")

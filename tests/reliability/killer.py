"""Fault injection for the kill drills: a callback that ends its own training process with
SIGKILL (no clean-up runs: no ``finally``, no atexit, no flush), either when a chosen step
starts or inside the save of the checkpoint of a chosen step, after the temporary file is
written and before it is renamed. It is added to a run with
``+callbacks.kill._target_=tests.reliability.killer.KillAt +callbacks.kill.step=N``."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    def __init__(self, step: int, during_save: bool = False):
        self.step = step
        self.during_save = during_save

    def setup(self, trainer, pl_module, stage) -> None:
        if not self.during_save:
            return
        save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if trainer.global_step == self.step:
                die()  # the temporary file is complete, the rename has not happened

        torch.save = save_then_die

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.during_save and trainer.global_step == self.step:
            die()

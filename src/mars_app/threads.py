"""Torch's thread count, chosen by measuring training steps while the run goes on.

On a CPU shared with another busy process, torch's threads wait for each other at the end of
every parallel operation, and a thread whose core the other process holds stalls them all.
Measured on 2 cores (stage I of the shapes world, docs/LOG.md): 7.6 steps/s alone with 2 threads,
1.85 beside one busy process (4x slower); 1 thread beside it makes 4.4 steps/s. Alone, 1 thread
makes only 5.0. No fixed count is right in both cases, and other jobs come and go, so the count is
measured: every ``every_n_steps`` steps each candidate runs a few steps and the fastest is kept.
"""

from __future__ import annotations

import statistics
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info


def candidate_counts(available: int) -> list[int]:
    """``available`` and its halvings down to 1: 8 -> [8, 4, 2, 1]."""
    counts = [available]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


class AdaptiveThreads(Callback):
    """Re-measure, every ``every_n_steps`` training steps (from step ``first_step``), the step time
    at each thread count from torch's initial count down to 1, and keep the fastest.

    Each count gets one step to settle (the first after a change pays for new threads), then
    ``probe_steps`` timed steps; their median decides. The count is logged as ``threads``. CPU
    only: with another accelerator, or one thread to try, it does nothing. ``max_threads``: the
    most threads tried (None: torch's count at the start). ``apps/demo.py`` starts the jobs it
    runs side by side with a share of the cores and the cores as their maximum
    (``MARS_MAX_THREADS``, read by ``conf/callbacks/adaptive_threads.yaml``), so a job whose
    neighbour has finished takes the freed core at its next probe. A change of count
    changes a step's numbers in the last bits (how sums are split across threads), so it is not in
    the default callbacks: the shapes recipes, made for busy CPUs, add it."""

    def __init__(self, every_n_steps: int = 500, probe_steps: int = 5, first_step: int = 20, max_threads: int | None = None) -> None:
        if every_n_steps <= 0 or probe_steps <= 0 or first_step < 0 or (max_threads is not None and max_threads < 1):
            raise ValueError(f"AdaptiveThreads needs every_n_steps > 0, probe_steps > 0, first_step >= 0, max_threads >= 1; got "
                             f"{every_n_steps}, {probe_steps}, {first_step}, {max_threads}")
        self.every_n_steps, self.probe_steps, self.first_step = every_n_steps, probe_steps, first_step
        self.max_threads = max_threads
        self.counts: list[int] = []
        self.next_probe = first_step  # the global step at which the next probe starts
        self.probe: list[int] = []  # counts still to measure in the running probe
        self.times: dict[int, list[float]] = {}
        self.batches_at_count = 0
        self.start = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        available = self.max_threads or torch.get_num_threads()
        self.counts = candidate_counts(available) if isinstance(trainer.accelerator, CPUAccelerator) and available > 1 else []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self.counts:
            return
        if not self.probe and trainer.global_step >= self.next_probe:
            self.probe, self.times, self.batches_at_count = list(self.counts), {}, 0
            self.next_probe = trainer.global_step + self.every_n_steps
        if self.probe:
            if self.batches_at_count == 0:
                torch.set_num_threads(self.probe[0])
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.probe:
            return
        if self.batches_at_count > 0:  # the first step at a new count settles it
            self.times.setdefault(self.probe[0], []).append(time.perf_counter() - self.start)
        self.batches_at_count += 1
        if self.batches_at_count > self.probe_steps:
            self.probe.pop(0)
            self.batches_at_count = 0
            if not self.probe:
                self.choose(pl_module)

    def choose(self, pl_module: LightningModule) -> None:
        medians = {count: statistics.median(times) for count, times in self.times.items()}
        best = min(medians, key=medians.get)
        torch.set_num_threads(best)
        timings = ", ".join(f"{count}: {seconds * 1000:.0f} ms" for count, seconds in medians.items())
        rank_zero_info(f"torch threads: {best} (median step time by thread count: {timings})")
        pl_module.log("threads", float(best), on_step=True, on_epoch=False, rank_zero_only=True)

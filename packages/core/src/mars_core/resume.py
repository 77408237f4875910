"""Where the training data stands, so that a resumed run reads exactly what an uninterrupted
one would have read.

Design choices:
- **Order from (seed, epoch) only.** Every shuffle of a training stream draws from a random
  generator seeded by the run's data seed, the epoch, the rank and the worker (and a stage
  name), never from the process's global generators. So an epoch's order is a function of
  its number, and the uninterrupted and the resumed run both compute it.
- **Position = batches consumed in the current epoch.** A datamodule stores
  ``{"epoch", "batches"}`` in the checkpoint (Lightning saves a datamodule's ``state_dict``);
  on resume the first epoch skips that many batches (after decoding, so the skipped batches
  are the very ones the first run trained on, bad samples and size buckets included). The
  count comes from the trainer's own progress (batches processed), not from the loader,
  because Lightning fetches batches ahead of the one being trained. A checkpoint written after
  an epoch's last batch points at the start of the next epoch: Lightning creates a resumed
  run's first iterator before it moves its epoch counter past the finished epoch, so the
  loader takes the later of the two epochs (``start``).
- The global generators stay untouched by data loading: loaders get their own
  ``torch.Generator`` for worker seeds, so the model's random draws (dropout, caption dropout,
  codebook restarts) match between the two runs once the checkpoint restores them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler, get_worker_info


def worker_info() -> tuple[int, int, int, int]:
    """(rank, world size, worker, number of workers) of the calling process."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    return rank, world, (info.id if info else 0), (info.num_workers if info else 1)


class StreamPosition:
    """The data seed, the current epoch and the point a resumed run starts from.

    ``epoch`` is set by the loader when an epoch starts; ``resume_epoch``/``resume_batches``
    come from the checkpoint. Picklable: DataLoader workers receive a copy at each epoch start.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0
        self.resume_epoch = -1
        self.resume_batches = 0

    def start(self, trainer_epoch: int) -> None:
        """An epoch starts: the trainer's epoch, or the resume point when that is later."""
        self.epoch = max(int(trainer_epoch), self.resume_epoch)

    def skip(self) -> int:
        """Batches of the current epoch that the interrupted run already trained on."""
        return self.resume_batches if self.epoch == self.resume_epoch else 0

    def rng(self, stage: str) -> random.Random:
        """A generator for one shuffle stage of this epoch, rank and worker."""
        rank, _, worker, _ = worker_info()
        return random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}/{stage}")

    def state_dict(self, trainer) -> dict:
        # Lightning's count of batches trained in this epoch (it prefetches, so the loader's own
        # count would be ahead); processed is complete when a checkpoint is written
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:  # the epoch is over: resume at the next one's start
            return {"seed": self.seed, "epoch": int(trainer.current_epoch) + 1, "batches": 0}
        return {"seed": self.seed, "epoch": int(trainer.current_epoch), "batches": int(progress.current.processed)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's data was shuffled with seed {state['seed']}, this run's data seed is "
                f"{self.seed}: resume with the same seed (or start a new run)"
            )
        self.resume_epoch, self.resume_batches = int(state["epoch"]), int(state["batches"])


def worker_share(batches: int, worker: int, num_workers: int) -> int:
    """How many of the first ``batches`` batches of a DataLoader came from ``worker``: the
    loader takes batches from its workers in turn."""
    return max(0, (batches - worker + num_workers - 1) // num_workers)


class ResumableSampler(Sampler[int]):
    """A shuffling sampler for map-style data whose order is a function of (seed, epoch) and
    which starts a resumed epoch after the batches already trained on. Lightning calls
    ``set_epoch`` at every epoch start."""

    def __init__(self, num_samples: int, batch_size: int, position: StreamPosition):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        self.position.start(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.position.rng("sampler").getrandbits(63))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        yield from order[self.position.skip() * self.batch_size :]

"""Lightning datamodules over webdataset shards.

``ShardDataModule`` reads any shards in the layouts of ``mars_data.webdata`` (local
directories, paths, brace patterns or URLs); ``ShapesDataModule`` is the same over the shapes
world, whose ``prepare_data`` writes the shards first if they are not there yet (Lightning
calls it once per node, before ``setup``), so a training run needs no separate data step.

Resuming (``mars_core.resume``): the training stream's order is a function of
(``shuffle_seed``, epoch), and the datamodule's ``state_dict`` (saved in every Lightning
checkpoint) holds the epoch and the batches trained in it; a resumed run skips those and
continues with exactly the batches the interrupted one would have read. The loader's workers
are restarted at every epoch (not persistent) so they see the epoch number, and worker seeds
come from the loader's own generator, not the global one the model draws from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mars_core.io import write_json_atomic
from mars_core.resume import StreamPosition
from mars_data.images import parse_resolution
from mars_data.shapes.captions import LANGS
from mars_data.shapes.shards import write_shards
from mars_data.webdata import SkipCounter, expand_urls, shard_pipeline

log = logging.getLogger(__name__)


class EpochLoader(DataLoader):
    """A DataLoader over a pipeline that tells the pipeline's ``StreamPosition`` the trainer's
    epoch each time an epoch starts (before the workers copy it)."""

    def __init__(self, pipeline, position: StreamPosition, epoch, **kwargs):
        super().__init__(pipeline, **kwargs)
        self.position = position
        self.current_epoch = epoch  # a callable: the trainer's epoch

    def __iter__(self):
        self.position.start(self.current_epoch())
        return super().__iter__()


class SkipMetrics(L.Callback):
    """Logs a datamodule's skipped data as metrics, ``data/skipped_<reason>``, from the first
    skip on, and the skips per shard at the end of training. (Nothing is logged while nothing
    was skipped: every value logged costs Lightning 0.2-0.25 ms a step on a CPU, docs/LOG.md.)"""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        skips = getattr(trainer.datamodule, "skips", None)
        if skips is not None and skips.count:
            pl_module.log_dict({f"data/skipped_{r}": float(c) for r, c in skips.by_reason().items()})

    def on_train_end(self, trainer, pl_module) -> None:
        skips = getattr(trainer.datamodule, "skips", None)
        if skips is not None and skips.count:
            for url, reasons in skips.by_shard().items():
                log.warning("skipped data in %s: %s", url, reasons)


class ShardDataModule(L.LightningDataModule):
    """Batches of images, captions, scene records and (optionally) pre-tokenized codes.

    Args:
        train_shards, val_shards: directory, path, brace pattern or URL, or a list of them.
        batch_size: samples per batch (per process); ``val_batch_size`` defaults to it.
        num_workers: DataLoader worker processes; shards are split between them.
        shuffle_buffer: samples held for shuffling the training stream (0: no shuffling).
        resampled: draw training shards at random with replacement, forever; needs
            ``samples_per_epoch``. Use it for multi-process training: every rank then runs
            the same number of batches (and gets data however few shards there are).
        samples_per_epoch: length of a training epoch (over all processes); None: one pass.
        load_images: decode images into ``batch["image"]``; off for code-only training, where
            image bytes are then never decoded.
        load_codes: read ``codes.npy`` members into ``batch["codes"]``; samples without one
            are skipped (and counted).
        resolutions: the sizes images are fitted to ("WxH"; each image to the nearest aspect
            ratio, resized to cover and centre-cropped: ``mars_data.images.prepare_image``);
            one square size is stage I's resize + centre crop. None keeps stored sizes.
            Batches are bucketed by size either way.
        extra_codes: names of further ``<name>.codes.npy`` members read into
            ``batch["<name>_codes"]`` (super-resolution triplets: ``[lowres]``).
        crop: train on random ``crop`` x ``crop`` windows of the images (validation keeps whole
            ones); None: whole images.
        shuffle_seed: seeds the training stream's order (with the epoch); resuming needs the same.
        max_failures: attempts in a row without a usable sample before reading stops with an
            error naming the shards and reasons.

    ``batch_stage`` / ``val_batch_stage``: set by a training module before the loaders are made
    (Lightning calls the module's ``setup`` first): a picklable ``stage(batches, skips, rng) ->
    batches`` run in the DataLoader workers, where the module builds its sequences.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        load_images: bool = True,
        load_codes: bool = False,
        resolutions: Sequence[str] | None = None,
        shuffle_seed: int = 0,
        max_failures: int = 1000,
        extra_codes: Sequence[str] = (),
        crop: int | None = None,
    ):
        super().__init__()
        if resampled and not samples_per_epoch:
            raise ValueError("resampled shards never end: set samples_per_epoch")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        sizes = [parse_resolution(r) for r in resolutions] if resolutions else None
        self.decoding = {"load_images": load_images, "load_codes": load_codes, "resolutions": sizes, "extra_codes": tuple(extra_codes)}
        self.crop = crop
        self.position = StreamPosition(shuffle_seed)
        self.max_failures = max_failures
        self.skips: SkipCounter | None = None  # of the training stream, made with its loader
        self.val_skips: SkipCounter | None = None
        self.batch_stage = self.val_batch_stage = None

    @property
    def skipped(self) -> int:
        """Samples and shard reads skipped so far, over this process and its workers."""
        return sum(s.count for s in (self.skips, self.val_skips) if s is not None)

    def state_dict(self) -> dict:
        return self.position.state_dict(self.trainer) if self.trainer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.position.load_state_dict(state)

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, pipeline) -> DataLoader:
        return EpochLoader(
            pipeline,
            self.position,
            lambda: self.trainer.current_epoch if self.trainer is not None else 0,
            batch_size=None,  # the pipeline batches (by size bucket)
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.position.seed),
        )

    def train_dataloader(self) -> DataLoader:
        batches_per_worker = None
        if self.samples_per_epoch:
            batches = math.ceil(self.samples_per_epoch / (self.batch_size * self._world_size()))
            batches_per_worker = math.ceil(batches / max(1, self.num_workers))
        urls = expand_urls(self.train_shards)
        self.skips = SkipCounter(urls, self.max_failures)
        pipeline = shard_pipeline(
            urls,
            batch_size=self.batch_size,
            skips=self.skips,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            batches_per_worker=batches_per_worker,
            position=self.position,
            batch_stage=self.batch_stage,
            crop=self.crop,
            **self.decoding,
        )
        if batches_per_worker is not None:
            # a declared length: Lightning (and mars_core's schedule) then know the epoch's steps
            pipeline = pipeline.with_length(batches_per_worker * max(1, self.num_workers))
        return self._loader(pipeline)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []  # Lightning then runs no validation
        urls = expand_urls(self.val_shards)
        self.val_skips = SkipCounter(urls, self.max_failures)
        pipeline = shard_pipeline(
            urls, batch_size=self.val_batch_size, skips=self.val_skips, batch_stage=self.val_batch_stage, **self.decoding
        )
        return DataLoader(pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class ShapesDataModule(ShardDataModule):
    """A ShardDataModule over the shapes world, generated on first use.

    The shards of a split live in ``root/<split>-<samples>-<digest>``, the digest naming the
    generation parameters, so changing them makes new data and never reuses stale shards; a
    ``manifest.json`` written last marks a split as complete. The training split uses the
    ``train`` random stream of ``seed``, validation the ``val`` stream (see
    ``mars_data.shapes.shards``); evaluation prompt files use a third stream.

    Args:
        root: directory for the generated shards.
        num_train_samples, num_val_samples: sizes of the splits (0 validation: none).
        seed, size, aspect_ratios, langs, samples_per_shard, jitter: as in
            ``mars_data.shapes.write_shards``; ``processes`` is how many write them.
        **loader: ShardDataModule arguments (batch_size, num_workers, ...).
    """

    def __init__(
        self,
        root: str,
        num_train_samples: int = 10_000,
        num_val_samples: int = 256,
        seed: int = 0,
        size: int | Sequence[int] = 64,
        aspect_ratios: Sequence[str] = ("1:1",),
        langs: Sequence[str] = LANGS,
        samples_per_shard: int = 1000,
        jitter: float = 0.0,
        processes: int | None = None,
        **loader,
    ):
        self.root = Path(root)
        self.world = {
            "seed": seed,
            "size": size if isinstance(size, int) else [int(s) for s in size],  # a list: each sample draws one
            "aspect_ratios": [str(r) for r in aspect_ratios],
            "langs": [str(lang) for lang in langs],
            "samples_per_shard": samples_per_shard,
            "jitter": jitter,
        }
        crop = loader.get("crop")
        smallest = min([size] if isinstance(size, int) else size)
        if crop is not None and crop > smallest:
            raise ValueError(f"crop={crop} is larger than the smallest render (size {smallest}): every sample would be skipped")
        self.processes = processes
        self.splits = {"train": num_train_samples, "val": num_val_samples}
        train_dir = self.split_dir("train")
        val_dir = self.split_dir("val") if num_val_samples else None
        super().__init__(train_shards=str(train_dir), val_shards=val_dir and str(val_dir), **loader)

    def split_dir(self, split: str) -> Path:
        params = {"split": split, "num_samples": self.splits[split], **self.world}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        return self.root / f"{split}-{self.splits[split]}-{digest}"

    def prepare_data(self) -> None:
        for split, num_samples in self.splits.items():
            directory = self.split_dir(split)
            manifest = directory / "manifest.json"
            if num_samples == 0 or manifest.exists():
                continue
            world = dict(self.world)
            paths = write_shards(
                directory,
                num_samples,
                world.pop("seed"),
                stream=split,
                processes=self.processes,
                **world,
            )
            params = {"split": split, "num_samples": num_samples, **self.world}
            write_json_atomic(manifest, {**params, "shards": [p.name for p in paths]})

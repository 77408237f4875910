"""Pre-tokenize webdataset shards: ``python apps/tokenize_shards.py tokenizer=DIR input=SHARDS output=DIR resolutions=[256x256]``.

Every shard of ``input`` (a directory of ``*.tar``, a brace pattern or a list) is copied to
``output`` under the same file name with one member added per sample: ``<key>.codes.npy``,
the tokenizer's codes of the sample's image (int16 h x w, int32 for codebooks above 32767
codes). All original members are kept, so the output serves both image and code-only
training (``mars_data.ShardDataModule(load_codes=True, load_images=False)``).

Images are prepared exactly as training prepares them (``mars_data.images.prepare_image``):
fitted to the nearest of ``resolutions`` (resize to cover, centre crop): stage I's one square
size (the paper: ``[256x256]``), or stage II's sizes (short side 256, aspect ratios up to 2).
So every code grid in the output is a size the model trains on; nothing is left to the
images' stored sizes.

Bad data never stops the job: a sample whose image cannot be read (corrupt, truncated, a
decompression bomb) is copied without codes, and a shard that cannot be read is left out;
both are counted per reason with their shard and key, and reported at the end
(``tokenize_report.json`` in ``output``). Each shard is written to a temporary file beside its
target and renamed when complete, so a finished shard is never partial; a rerun skips the
shards already written (resume after an interruption) and clears temporaries a kill left. The
output's ``shards.json`` lists each shard's sample count, so a reader notices a shard cut short.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from mars_app.cli import run_app
from mars_core.io import atomic_path, remove_stale_temporaries, write_json_atomic
from mars_data.images import ImageError, parse_resolution
from mars_data.tars import Member, npy_member, read_samples, split_key, write_manifest
from mars_data.webdata import CODES_KEY, IMAGE_KEYS, decode_image, expand_urls
from mars_tokenizer import VQTokenizer

log = logging.getLogger(__name__)
REPORT = "tokenize_report.json"


def codes_member(key: str, codes: torch.Tensor, codebook_size: int) -> Member:
    return npy_member(f"{key}.{CODES_KEY}", codes.numpy().astype(np.int16 if codebook_size <= 32767 else np.int32))


class ShardTokenizer:
    """Adds codes to the samples of shards, encoding prepared images in same-size batches."""

    def __init__(self, tokenizer: VQTokenizer, resolutions: list[tuple[int, int]], batch_size: int):
        for width, height in resolutions:
            if width % tokenizer.downsample or height % tokenizer.downsample:
                raise ValueError(f"resolution {width}x{height} is not a multiple of the tokenizer's downsampling {tokenizer.downsample}")
        self.tokenizer = tokenizer
        self.resolutions = resolutions
        self.batch_size = batch_size
        self.skipped: Counter = Counter()  # reason -> samples or shards
        self.examples: dict[str, list[str]] = {}  # reason -> the first "shard/key"s

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 20:
            self.examples[reason].append(where)
        log.warning("%s: %s", where, reason)

    def encode_batch(self, samples: list[tuple[str, list, torch.Tensor | None]]) -> list[list]:
        """Members of each sample plus its codes member (images grouped by size)."""
        codes: dict[int, torch.Tensor] = {}
        by_size: dict[tuple, list[int]] = {}
        for i, (_, _, image) in enumerate(samples):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for indices in by_size.values():
            encoded = self.tokenizer.encode(torch.stack([samples[i][2] for i in indices]))
            codes.update(zip(indices, encoded.cpu()))
        return [
            members + [codes_member(key, codes[i], self.tokenizer.codebook_size)] if i in codes else members
            for i, (key, members, _) in enumerate(samples)
        ]

    def prepare(self, source: str, key: str, members: list[Member]) -> torch.Tensor | None:
        image = next((data for info, data in members if split_key(info.name)[1].lower() in IMAGE_KEYS), None)
        if image is None:
            self.skip("no image member", f"{source}/{key}")
            return None
        try:
            return decode_image(image, self.resolutions)
        except ImageError as error:
            self.skip("unreadable image", f"{source}/{key}: {str(error).split(': ', 1)[-1]}")
            return None

    def tokenize_shard(self, source: str, target: Path, bar: tqdm) -> int:
        """Write ``target``; returns its number of samples."""
        samples = 0
        with atomic_path(target) as tmp, tarfile.open(tmp, "w") as out:
            pending: list = []

            def flush() -> None:
                for members in self.encode_batch(pending):
                    for info, data in members:
                        out.addfile(info, io.BytesIO(data))
                bar.update(len(pending))
                pending.clear()

            for key, members in read_samples(source):
                members = [(info, data) for info, data in members if split_key(info.name)[1] != CODES_KEY]
                pending.append((key, members, self.prepare(source, key, members)))
                samples += 1
                if len(pending) == self.batch_size:
                    flush()
            flush()
        return samples


def tokenize_shards(cfg: DictConfig) -> list[Path]:
    """Copy the shards of cfg.input to cfg.output adding codes; returns the shards in output."""
    if not cfg.get("resolutions"):
        raise ValueError("set resolutions: the sizes images are prepared to, e.g. resolutions=[256x256] (stage I)")
    resolutions = [parse_resolution(r) for r in cfg.resolutions]
    tokenizer = VQTokenizer.from_pretrained(cfg.tokenizer, device=cfg.device)
    sources = expand_urls(cfg.input)
    output = Path(cfg.output)
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards share file names; they would overwrite each other in {output}")
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    worker = ShardTokenizer(tokenizer, resolutions, cfg.batch_size)
    written, resumed = [], 0
    with tqdm(desc="tokenizing", unit="sample") as bar:
        for source, name in zip(sources, names):
            target = output / name
            if target.exists():  # written whole by an earlier run (atomic rename)
                resumed += 1
                written.append(target)
                continue
            try:
                samples = worker.tokenize_shard(source, target, bar)
            except (OSError, tarfile.TarError, EOFError) as error:
                worker.skip("unreadable shard", f"{source}: {type(error).__name__}: {error}")
                continue
            write_manifest(output, {name: samples})  # readers detect a shard cut short later
            written.append(target)
    report = {
        "shards_in": len(sources),
        "shards_written": len(written) - resumed,
        "shards_already_there": resumed,
        "resolutions": list(cfg.resolutions),
        "skipped": dict(worker.skipped),
        "skipped_examples": worker.examples,
    }
    write_json_atomic(output / REPORT, report)
    if worker.skipped:
        log.warning("skipped: %s (details in %s)", dict(worker.skipped), output / REPORT)
    log.info("%d shards in %s (%d already there)", len(written), output, resumed)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="tokenize_shards")
def main(cfg: DictConfig) -> None:
    run_app(tokenize_shards, cfg)


if __name__ == "__main__":
    main()

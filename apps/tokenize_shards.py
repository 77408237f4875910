"""Pre-tokenize webdataset shards: ``python apps/tokenize_shards.py tokenizer=DIR input=SHARDS output=DIR``.

Every shard of ``input`` (a directory of ``*.tar``, a brace pattern or a list) is copied to
``output`` under the same file name with one member added per sample: ``<key>.codes.npy``,
the tokenizer's codes of the sample's image (int16 h x w, int32 for codebooks above 32767
codes). All original members are kept, so the output serves both image and code-only
training (``mars_data.ShardDataModule(load_codes=True, load_images=False)``). Images of any
size that is a multiple of the tokenizer's downsampling factor are encoded at their stored
size; samples without an image, or with one that cannot be encoded, are copied without codes
and counted. Each shard is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from mars_data.tars import Member, npy_member, read_samples, split_key
from mars_data.webdata import CODES_KEY, IMAGE_KEYS, decode_image, expand_urls
from mars_tokenizer import VQTokenizer

log = logging.getLogger(__name__)


def codes_member(key: str, codes: torch.Tensor, codebook_size: int) -> Member:
    return npy_member(f"{key}.{CODES_KEY}", codes.numpy().astype(np.int16 if codebook_size <= 32767 else np.int32))


class ShardTokenizer:
    """Adds codes to the samples of shards, encoding images in same-size batches."""

    def __init__(self, tokenizer: VQTokenizer, batch_size: int):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.without_codes = 0

    def encode_batch(self, samples: list[tuple[str, list, torch.Tensor | None]]) -> list[list]:
        """Members of each sample plus its codes member (images grouped by size)."""
        codes: dict[int, torch.Tensor] = {}
        by_size: dict[tuple, list[int]] = {}
        for i, (_, _, image) in enumerate(samples):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for size, indices in by_size.items():
            try:
                encoded = self.tokenizer.encode(torch.stack([samples[i][2] for i in indices]))
            except ValueError as error:  # e.g. a size that is not a multiple of the factor
                log.warning("%d images of size %s left without codes: %s", len(indices), size, error)
                continue
            codes.update(zip(indices, encoded.cpu()))
        out = []
        for i, (key, members, _) in enumerate(samples):
            if i in codes:
                members = members + [codes_member(key, codes[i], self.tokenizer.codebook_size)]
            else:
                self.without_codes += 1
            out.append(members)
        return out

    def tokenize_shard(self, source: str | Path, target: Path, bar: tqdm) -> None:
        tmp = target.with_name(target.name + ".tmp")
        with tarfile.open(tmp, "w") as out:
            pending: list = []

            def flush() -> None:
                for members in self.encode_batch(pending):
                    for info, data in members:
                        out.addfile(info, io.BytesIO(data))
                bar.update(len(pending))
                pending.clear()

            for key, members in read_samples(source):
                members = [(info, data) for info, data in members if split_key(info.name)[1] != CODES_KEY]
                image = next((data for info, data in members if split_key(info.name)[1].lower() in IMAGE_KEYS), None)
                try:
                    pending.append((key, members, None if image is None else decode_image(image)))
                except OSError as error:
                    log.warning("sample %s of %s: image not decodable (%s)", key, source, error)
                    pending.append((key, members, None))
                if len(pending) == self.batch_size:
                    flush()
            flush()
        os.replace(tmp, target)


def tokenize_shards(cfg: DictConfig) -> list[Path]:
    """Copy the shards of cfg.input to cfg.output adding codes; returns the written shards."""
    tokenizer = VQTokenizer.from_pretrained(cfg.tokenizer, device=cfg.device)
    sources = expand_urls(cfg.input)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards share file names; they would overwrite each other in {output}")
    worker = ShardTokenizer(tokenizer, cfg.batch_size)
    written = []
    with tqdm(desc="tokenizing", unit="sample") as bar:
        for source, name in zip(sources, names):
            worker.tokenize_shard(source, output / name, bar)
            written.append(output / name)
    if worker.without_codes:
        log.warning("%d samples were copied without codes", worker.without_codes)
    log.info("wrote %d shards to %s", len(written), output)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="tokenize_shards")
def main(cfg: DictConfig) -> None:
    tokenize_shards(cfg)


if __name__ == "__main__":
    main()

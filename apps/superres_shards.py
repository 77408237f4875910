"""Super-resolution triplets: ``python apps/superres_shards.py tokenizer=DIR input=SHARDS output=DIR``.

Every sample of ``input`` (webdataset shards with an image and a caption: shapes-world or
img2dataset layout) becomes a (low-res codes, caption, high-res codes) triplet:

- high-res size: the low-res size's long side scaled to ``long_side``, aspect ratio kept
  (``mars_superres.hires_size``); the image is resized to it (bicubic);
- low-res image: the high-res image resized down (bicubic) to short side ``lowres_short_side``
  (both sides multiples of the tokenizer's downsampling), or the sample's own low-res image
  member (``lowres_member``, e.g. ``lowres.png`` of ``mars_data.shapes shards --lowres 64``:
  a render at the low-res size is what a base model trained on renders draws, while a
  bicubic resize blends every edge), then the optional degradations (Gaussian blur, JPEG
  re-encoding) that make the model robust to the base model's outputs, then read at
  ``lowres_scale`` times its size (``mars_superres.lowres_input``; the model's own
  ``model.lowres_scale``, which training checks);
- both encoded with the VQ tokenizer: ``<key>.codes.npy`` (high-res) and
  ``<key>.lowres.codes.npy``, by default the low-res codes of the tokenizer's own
  reconstruction (``degradations.round_trip``: encode, decode to an 8-bit image, encode again),
  as the cascade reads its base image, a decoded one; the caption and record members (txt,
  json) are copied, the image only with ``keep_images``. Training reads them with ``data=superres_triplets``.

Shards keep their file names; each is written to a temporary name and renamed when complete
(``mars_core.io.atomic_path``). A sample whose image cannot be read is skipped and counted.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageFilter
from tqdm import tqdm

from mars_app.pipeline import from_pil, to_pil
from mars_core.io import atomic_path
from mars_data.images import load_image
from mars_data.tars import npy_member, read_samples, split_key
from mars_data.webdata import CODES_KEY, IMAGE_KEYS, expand_urls
from mars_superres import hires_size, lowres_input
from mars_tokenizer import VQTokenizer

log = logging.getLogger(__name__)
LOWRES = "lowres"  # the low-res codes member: <key>.lowres.codes.npy (data.extra_codes)


def lowres_size(width: int, height: int, short_side: int, multiple: int) -> tuple[int, int]:
    """Short side ``short_side``, aspect ratio kept, the long side rounded to ``multiple``."""
    scale = short_side / min(width, height)
    long = max(multiple, round(max(width, height) * scale / multiple) * multiple)
    return (long, short_side) if width >= height else (short_side, long)


class TripletMaker:
    """Resizes, degrades and encodes the images of shards, in same-size batches."""

    def __init__(self, tokenizer: VQTokenizer, cfg: DictConfig):
        self.tokenizer = tokenizer
        self.f = tokenizer.downsample
        if cfg.lowres_short_side % self.f or cfg.long_side % self.f:
            raise ValueError(
                f"lowres_short_side={cfg.lowres_short_side} and long_side={cfg.long_side} must be multiples "
                f"of the tokenizer's downsampling {self.f}"
            )
        self.cfg = cfg
        self.skipped = 0
        self.dtype = np.int16 if tokenizer.codebook_size <= 32767 else np.int32

    def pair(self, image: Image.Image, lowres: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(high-res, low-res) images as tensors in [-1, 1]; ``lowres``: the sample's own
        low-res image (it must have the low-res size), else the high-res one resized down."""
        low = lowres_size(*image.size, self.cfg.lowres_short_side, self.f)
        high = hires_size(*low, self.cfg.long_side, self.f)
        hi = image if image.size == high else image.resize(high, Image.Resampling.BICUBIC)
        if lowres is not None and lowres.size != low:
            raise ValueError(f"its {self.cfg.lowres_member} is {lowres.size[0]}x{lowres.size[1]}, not the low-res size {low[0]}x{low[1]}")
        lo = lowres if lowres is not None else hi.resize(low, Image.Resampling.BICUBIC)
        degrade = self.cfg.degradations
        if degrade.blur:
            lo = lo.filter(ImageFilter.GaussianBlur(degrade.blur))
        if degrade.jpeg_quality:
            buffer = io.BytesIO()
            lo.save(buffer, format="JPEG", quality=int(degrade.jpeg_quality))
            lo = load_image(buffer.getvalue(), "the degraded low-res image")
        return from_pil([hi])[0], lowres_input(from_pil([lo])[0], self.cfg.lowres_scale)

    def batched(self, items: list[torch.Tensor], fn) -> list[torch.Tensor]:
        """``fn`` over same-shape batches of ``items``, one output per item, in order."""
        out: list = [None] * len(items)
        by_shape: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            by_shape.setdefault(tuple(item.shape), []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.cfg.batch_size):
                chunk = indices[start : start + self.cfg.batch_size]
                for i, y in zip(chunk, fn(torch.stack([items[i] for i in chunk])).cpu()):
                    out[i] = y
        return out

    def encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes of each image."""
        return self.batched(images, self.tokenizer.encode)

    def round_trip(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """The codes of each code grid's decoded image, quantized to 8 bits as a saved image is:
        what the cascade reads from a base image (a decode). About 12% of the shapes demo
        tokenizer's codes change on the way (docs/LOG.md)."""
        def again(batch: torch.Tensor) -> torch.Tensor:
            return self.tokenizer.encode(from_pil(to_pil(self.tokenizer.decode(batch))))

        return self.batched(codes, again)

    def shard(self, source: str, target: Path, bar: tqdm) -> None:
        samples = []
        own = self.cfg.lowres_member
        for key, members in read_samples(source):
            image = next((data for info, data in members if split_key(info.name)[1].lower() in IMAGE_KEYS), None)
            lowres = next((data for info, data in members if split_key(info.name)[1].lower() == own), None) if own else None
            try:
                if image is None:
                    raise ValueError("no image member")
                if own and lowres is None:
                    raise ValueError(f"no {own} member (lowres_member)")
                hi, lo = self.pair(
                    load_image(image, f"sample {key} of {source}"),
                    load_image(lowres, f"the {own} of sample {key} of {source}") if own else None,
                )
            except ValueError as error:  # ImageError is a ValueError
                self.skipped += 1
                log.warning("skipped sample %s of %s: %s", key, source, error)
                continue
            keep = [
                (info, data) for info, data in members
                if not split_key(info.name)[1].endswith(CODES_KEY)
                and (self.cfg.keep_images or split_key(info.name)[1].lower() not in (*IMAGE_KEYS, own))
            ]
            samples.append((key, keep, hi, lo))
        high = self.encode([s[2] for s in samples])
        low = self.encode([s[3] for s in samples])
        if self.cfg.degradations.round_trip:
            low = self.round_trip(low)
        with atomic_path(target) as tmp, tarfile.open(tmp, "w") as out:
            for (key, members, _, _), hi_codes, lo_codes in zip(samples, high, low):
                members = members + [
                    npy_member(f"{key}.{CODES_KEY}", hi_codes.numpy().astype(self.dtype)),
                    npy_member(f"{key}.{LOWRES}.{CODES_KEY}", lo_codes.numpy().astype(self.dtype)),
                ]
                for info, data in members:
                    out.addfile(info, io.BytesIO(data))
                bar.update(1)


def superres_shards(cfg: DictConfig) -> list[Path]:
    """Write the triplet shards of cfg.input to cfg.output; returns them."""
    sources = expand_urls(cfg.input)
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards share file names; they would overwrite each other in {cfg.output}")
    maker = TripletMaker(VQTokenizer.from_pretrained(cfg.tokenizer, device=cfg.device), cfg)
    output = Path(cfg.output)
    written = []
    with tqdm(desc="triplets", unit="sample") as bar:
        for source, name in zip(sources, names):
            maker.shard(source, output / name, bar)
            written.append(output / name)
    if maker.skipped:
        log.warning("%d samples skipped (no readable image)", maker.skipped)
    log.info("wrote %d triplet shards to %s", len(written), output)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="superres_shards")
def main(cfg: DictConfig) -> None:
    superres_shards(cfg)


if __name__ == "__main__":
    main()

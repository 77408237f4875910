"""FID: torchmetrics' ``FrechetInceptionDistance`` on the FID Inception features, with the
protocol of LlamaGen's / GigaGAN's COCO script by default.

Design choices:
- The metric (feature sums, covariances, the Frechet distance) is torchmetrics'; only the
  feature network is ours (``inception.FIDInceptionV3``: torch-fidelity, torchmetrics' default,
  cannot be imported without torchvision, see that module). Its weights are
  ``pt_inception-2015-12-05-6726825d.pth`` read from the path the user gives.
- Preprocessing (``Preprocess``), the same for generated and reference images: centre crop to
  a square of the short side, resize to 256x256 with Lanczos (LlamaGen's
  ``evaluations/t2i/evaluation.py``, from GigaGAN: ``CenterCropLongEdge`` + ``Image.LANCZOS``),
  then the network's own resize to 299. Every choice is an option and goes into the summary.
  LlamaGen then scores with clean-fid, whose 256 -> 299 resize differs from the reference
  graph's (ours, torch-fidelity's, torchmetrics'); compare numbers within one protocol only.
- Reference statistics (the real images' feature sum, sum of outer products and count: the
  metric's own states) are cached in ``cache_dir`` under a key of the reference folder's
  listing (relative path, size and mtime of every image), the preprocessing and the weights'
  sha256: a changed folder, protocol or network computes them anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from mars_core.io import atomic_path

from .protocol import list_images, read_images

RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
CROPS = ("center", "none")


@dataclass(frozen=True)
class Preprocess:
    """What is done to every image before the feature network sees it."""

    resize: int | None = 256  # square side in pixels; None keeps the size
    crop: str = "center"  # center: the largest centred square; none: the whole image
    resample: str = "lanczos"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"fid.crop={self.crop!r}: one of {', '.join(CROPS)}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"fid.resample={self.resample!r}: one of {', '.join(RESAMPLE)}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"fid.resize={self.resize}: a side in pixels, or null")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> uint8 tensor (3, H, W)."""
        if self.crop == "center":
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if self.resize is not None:
            image = image.resize((self.resize, self.resize), RESAMPLE[self.resample])
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def accumulate(metric: FrechetInceptionDistance, paths: list[Path], real: bool, preprocess: Preprocess,
               batch_size: int, skipped: list[str], desc: str) -> int:
    """Feed the images at ``paths`` to the metric in batches of equal size; returns how many were used."""
    device = metric.device
    batch: list[torch.Tensor] = []
    used = 0

    def flush():
        nonlocal used
        if batch:
            with torch.no_grad():
                metric.update(torch.stack(batch).to(device), real=real)
            used += len(batch)
            batch.clear()

    for _, image in tqdm(read_images(paths, skipped), total=len(paths), desc=desc, unit="image"):
        pixels = preprocess(image)
        if batch and (len(batch) == batch_size or pixels.shape != batch[0].shape):
            flush()
        batch.append(pixels)
    flush()
    return used


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def reference_key(folder: Path, paths: list[Path], preprocess: Preprocess, weights_sha256: str) -> str:
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    text = json.dumps({"images": listing, "preprocess": asdict(preprocess), "weights": weights_sha256})
    return hashlib.sha256(text.encode()).hexdigest()


def reference_statistics(metric: FrechetInceptionDistance, folder: Path, preprocess: Preprocess, weights_sha256: str,
                         batch_size: int, cache_dir: Path | None) -> dict:
    """Fill the metric's real-image states from the cache or by reading ``folder``; returns
    ``{"images", "skipped", "cache"}`` (the cache file, or None when caching is off)."""
    paths = list_images(folder, recursive=True)
    if not paths:
        raise ValueError(f"fid.reference={folder} has no png/jpg images")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"fid_reference_{reference_key(folder, paths, preprocess, weights_sha256)[:32]}.pt"
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            for name in REAL_STATES:
                setattr(metric, name, stored[name].to(metric.device))
            return {"images": int(stored["real_features_num_samples"]), "skipped": stored["skipped"], "cache": str(cache)}
    skipped: list[str] = []
    used = accumulate(metric, paths, True, preprocess, batch_size, skipped, "reference images")
    if used < 2:
        raise ValueError(f"fid.reference={folder}: {used} readable images, FID needs at least 2")
    if cache is not None:
        with atomic_path(cache) as tmp:
            torch.save({**{name: getattr(metric, name).cpu() for name in REAL_STATES}, "skipped": skipped}, tmp)
    return {"images": used, "skipped": skipped, "cache": None if cache is None else str(cache)}


def frechet_inception_distance(images: Path, reference: Path, feature: nn.Module, weights_sha256: str,
                               preprocess: Preprocess = Preprocess(), batch_size: int = 32,
                               cache_dir: Path | None = None, device: str = "cpu") -> tuple[float, dict]:
    """FID between the images under ``images`` and those under ``reference`` (both searched
    recursively); returns (fid, record of what was measured)."""
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(device)
    real = reference_statistics(metric, reference, preprocess, weights_sha256, batch_size, cache_dir)
    paths = list_images(images, recursive=True)
    skipped: list[str] = []
    used = accumulate(metric, paths, False, preprocess, batch_size, skipped, "generated images")
    if used < 2:
        raise ValueError(f"images={images}: {used} readable images, FID needs at least 2")
    record = {"images": used, "skipped": skipped, "reference": str(reference), "reference_images": real["images"],
              "reference_skipped": real["skipped"], "reference_cache": real["cache"], **asdict(preprocess)}
    return float(metric.compute()), record

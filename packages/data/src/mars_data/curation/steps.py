"""The model steps as Ray Data callable classes (one model per actor, batches of rows).

Each takes a numpy batch (a dict of column arrays), computes its scores or captions for the
rows not dropped yet (dropped rows pass through untouched, without image bytes), applies its
thresholds, and adds ``time_<step>``: the batch's busy seconds spread over its rows, so that
the driver's sum per step is that step's busy time. The same classes run in a plain loop
(``benchmarks/curation.py``) by calling them on a batch.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mars_data.curation.models import AestheticHead, ClipScorer, Recaptioner, pick_device
from mars_data.curation.recipe import AestheticStep, ClipStep, RecaptionStep
from mars_data.images import load_image


def _todo(batch: dict) -> np.ndarray:
    return np.flatnonzero(np.asarray(batch["drop"], dtype=object) == "")


def _images(batch: dict, rows: np.ndarray) -> list:
    return [load_image(batch["image"][i], what=f"{batch['shard'][i]}:{batch['key'][i]}") for i in rows]


def _drop(batch: dict, rows, step: str, reasons: list[str]) -> None:
    drop = np.asarray(batch["drop"], dtype=object).copy()
    why = np.asarray(batch["reason"], dtype=object).copy()
    image = np.asarray(batch["image"], dtype=object).copy()
    for i, reason in zip(rows, reasons):
        drop[i], why[i], image[i] = step, reason, b""
    batch["drop"], batch["reason"], batch["image"] = drop, why, image


class ClipAesthetic:
    """CLIP score and, with a head file, the aesthetic score from the same image embeddings."""

    def __init__(self, clip: ClipStep, aesthetic: AestheticStep, num_gpus: float = 0):
        device = pick_device(num_gpus)
        self.clip, self.aesthetic = clip, aesthetic
        self.scorer = ClipScorer(clip.model, device)
        self.head = None
        if aesthetic.enabled:
            self.head = AestheticHead.from_file(aesthetic.head).to(device)  # its input size: checked by the driver

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        n = len(batch["key"])
        clip_scores = np.asarray(batch["clip_score"], dtype=np.float64).copy()
        aesthetic_scores = np.asarray(batch["aesthetic_score"], dtype=np.float64).copy()
        rows = _todo(batch)
        if len(rows):
            with torch.inference_mode():
                scores, embeddings = self.scorer(_images(batch, rows), [str(batch["caption"][i]) for i in rows])
                clip_scores[rows] = scores.numpy()
                if self.head is not None:
                    aesthetic_scores[rows] = self.head(embeddings).float().cpu().numpy()
        batch["clip_score"], batch["aesthetic_score"] = clip_scores, aesthetic_scores
        for step, scores, threshold in (("clip", clip_scores, self.clip.min_score),
                                        ("aesthetic", aesthetic_scores, self.aesthetic.min_score if self.head else None)):
            if threshold is not None:
                low = [i for i in rows if scores[i] < threshold]
                _drop(batch, low, step, [f"{batch['shard'][i].rsplit('/', 1)[-1]}:{batch['key'][i]}: {step} score "
                                         f"{scores[i]:.4f} < {threshold}" for i in low])
        batch["time_clip"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return batch


class Recaption:
    """New captions from a vision-language model for the rows still kept."""

    def __init__(self, recaption: RecaptionStep, num_gpus: float = 0):
        self.captioner = Recaptioner(recaption.model, pick_device(num_gpus), recaption.prompt, recaption.max_new_tokens)

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        n = len(batch["key"])
        captions = np.asarray(batch["new_caption"], dtype=object).copy()
        rows = _todo(batch)
        if len(rows):
            for i, caption in zip(rows, self.captioner(_images(batch, rows))):
                captions[i] = caption
        batch["new_caption"] = captions
        batch["time_recaption"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return batch


def rows_to_batch(rows: list[dict]) -> dict:
    """Rows -> a numpy batch as Ray Data hands it to ``map_batches`` (for the plain loop)."""
    return {key: np.array([row[key] for row in rows], dtype=object if isinstance(rows[0][key], (str, bytes)) else None)
            for key in rows[0]}


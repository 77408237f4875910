"""CLIPScore: torchmetrics' ``CLIPScore`` with a CLIP model loaded by path through transformers.

Convention (stated in every summary): torchmetrics', i.e. the CLIPScore paper's
(Hessel et al. 2021) without its 2.5 weight: 100 x the cosine of CLIP's projected image and
text embeddings, averaged over the pairs, and the average clamped at 0
(``max(100 * mean cos, 0)``; the paper's per-pair clamp gives the same number whenever every
cosine is positive, as it is for real CLIP pairs). The text is the prompt as drawn, no
"A photo depicts" prefix (LlamaGen's script adds one), truncated to CLIP's 77 positions.
MARS's table gives CLIPScore 32.33 without naming the CLIP model; torchmetrics' default is
ViT-L/14 (openai/clip-vit-large-patch14), LlamaGen's script uses ViT-B/32: the summary names
the model directory and the sha256 of its weights.

Design choices:
- torchmetrics takes a callable returning (model, processor). With transformers 5,
  ``get_image_features`` / ``get_text_features`` return a model output instead of a tensor;
  ``CLIPFeatures`` hands torchmetrics the projected embeddings (``pooler_output``).
- Image and text processing is the model directory's own processor (``AutoProcessor``); without
  torchvision transformers uses its PIL image processor (same resize and crop).
- T2I-CompBench's non-spatial score is the mean raw cosine (its CLIP_similarity.py, ViT-B/32):
  ``clip_score(...) / 100``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from tqdm import tqdm

CONVENTION = "torchmetrics CLIPScore: max(100 * mean cosine(CLIP image, CLIP text), 0), prompt as drawn, 77 tokens"


class CLIPFeatures(nn.Module):
    """A transformers ``CLIPModel`` whose feature methods return the projected embeddings as tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def describe(self) -> str:
        """The image tower in words (ViT-L/14 reads "patch 14, 224 px, 24 layers, width 1024")."""
        vision = self.config.vision_config
        return (f"CLIP image tower: patch {vision.patch_size}, {vision.image_size} px, {vision.num_hidden_layers} layers, "
                f"width {vision.hidden_size}; projection {self.config.projection_dim}")

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(directory: Path) -> tuple[CLIPFeatures, object]:
    """(model, processor) from a ``save_pretrained`` directory (e.g. openai/clip-vit-large-patch14)."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPFeatures(CLIPModel.from_pretrained(directory).eval()), AutoProcessor.from_pretrained(directory)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def clip_score(model: CLIPFeatures, processor, pairs: Iterable[tuple[Image.Image, str]], total: int | None = None,
               batch_size: int = 32, device: str = "cpu", desc: str = "CLIPScore") -> tuple[float, int]:
    """torchmetrics CLIPScore of the (image, text) pairs, read lazily; returns (score, pairs scored)."""
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    images: list[torch.Tensor] = []
    texts: list[str] = []
    count = 0

    def flush():
        nonlocal count
        if images:
            metric.update(list(images), list(texts))
            count += len(images)
            images.clear()
            texts.clear()

    with torch.no_grad():
        for image, text in tqdm(pairs, total=total, desc=desc, unit="image"):
            images.append(to_tensor(image).to(device))
            texts.append(text)
            if len(images) == batch_size:
                flush()
        flush()
    if count == 0:
        raise ValueError("CLIPScore: no readable image-text pair")
    return float(metric.compute()), count

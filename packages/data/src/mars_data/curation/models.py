"""The models of curation, each loaded from a local path (nothing is downloaded).

- CLIP through transformers (``CLIPModel`` + ``CLIPProcessor`` from one directory). The CLIP
  score is the cosine similarity of the normalised image and text embeddings (LAION's
  convention, so LAION's published thresholds apply), not CLIPScore's ``100 * max(cos, 0)``.
- The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor):
  its MLP, laid out exactly as the reference (``layers`` = Linear, Dropout, Linear, Dropout,
  Linear, Dropout, Linear, Linear; no activations), so the published ``.pth`` state dicts load
  unchanged (``torch.load(weights_only=True)``; ``.safetensors`` too). It reads the
  L2-normalised CLIP image embedding, which the CLIP step computes anyway: one CLIP forward
  feeds both scores, and its input size (768 for ViT-L/14) must equal the CLIP's projection.
- A vision-language model for recaptioning: any image-text-to-text model transformers loads
  with ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a directory.

A missing or absent path is a ``ValueError`` naming the option to set. ``fingerprint`` gives
a short, stable identity of a model directory or file for the version fields of the output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def fingerprint(path: str | Path) -> str:
    """``<name>@<12 hex>``: for a file its sha256; for a model directory the sha256 of its
    config files and of the names and sizes of its other files (weights are not read)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode())
            if item.suffix == ".json":
                digest.update(item.read_bytes())
            else:
                digest.update(str(item.stat().st_size).encode())
    return f"{path.name}@{digest.hexdigest()[:12]}"


def pick_device(num_gpus: float) -> torch.device:
    """cuda when Ray gave this worker a GPU (Ray sets CUDA_VISIBLE_DEVICES), else cpu."""
    return torch.device("cuda" if num_gpus and torch.cuda.is_available() else "cpu")


class AestheticHead(nn.Module):
    """The improved aesthetic predictor's MLP; ``forward`` takes normalised CLIP image embeddings."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticHead:
        """Load a state dict saved by the reference code (``.pth``/``.pt``) or as safetensors."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ValueError(f"{path}: not an aesthetic predictor state dict (no layers.0.weight; keys {sorted(state)[:4]}...)")
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()


class ClipScorer:
    """CLIP image-text cosine similarity and the normalised image embeddings, batched."""

    def __init__(self, model_dir: str | Path, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_dir).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir)
        self.device = device
        # tokenizers saved without model_max_length would not truncate: use the position table's size
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def __call__(self, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length).to(self.device)
        out = self.model(**inputs)
        # CLIPModel's forward returns the projected embeddings already L2-normalised
        return (out.image_embeds * out.text_embeds).sum(-1).float().cpu(), out.image_embeds.float()


class Recaptioner:
    """Greedy captions from an image-text-to-text model for one instruction prompt."""

    def __init__(self, model_dir: str | Path, device: torch.device, prompt: str, max_new_tokens: int):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation continues at the right end
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.text = self.prompt_text(self.processor, prompt)

    @staticmethod
    def prompt_text(processor, prompt: str) -> str:
        """The model's own chat format around one image and the prompt, when it has one."""
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    @torch.inference_mode()
    def __call__(self, images: list) -> list[str]:
        inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]

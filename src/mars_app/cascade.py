"""The MARS cascade: text -> base image (``MarsPipeline``) -> high-resolution image (stage III).

A super-resolution checkpoint directory (``mars_superres.SuperResModule.export``)::

    superres_config.json    K_max (tokens_per_step), long side, the low-res sizes it reads
    superres.safetensors    the K-1 extra heads and the high-res type embedding
    semvie/                 its SemVIE (the frozen text LLM referenced by path)
    tokenizer/              the VQ tokenizer (stage III's own, model.tokenizer_path; else the base model's)
    text_tokenizer/         the text LLM's tokenizer

Design choices:
- The base image is re-encoded with the VQ tokenizer (not handed over as the base model's
  codes): the super-resolution model was trained on codes of images, and any image (a
  user's, a render) can be upscaled the same way; at the model's ``lowres_scale``.
- Prompts: the requested high-res size and the caption (``mars_semvie.sequences``, stage II),
  then the low-res image (``SuperResModel.prompt_ids``); the unconditional prompt keeps the
  size and the low-res image and drops the caption, as in training.
- Decoding is ``mars_superres.decode`` (``tokens_per_step`` K <= the model's K_max, ``mode``
  fast or exact); row ends and ``<image_end>`` are placed. Image i draws with the generator
  seeded ``seed + i``. Decoding statistics (forward passes, mean accepted length) are
  returned with the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from mars_app.pipeline import MarsPipeline, from_pil, to_pil
from mars_semvie.sequences import code_grid, codes_from_ids, collate, encode_prompt, image_slots, resolution_text
from mars_superres import DecodeStats, SuperResModel, decode, hires_size, lowres_input
from mars_superres.decoding import MODES
from mars_superres.model import parse_size
from mars_tokenizer import VQTokenizer


class SuperResPipeline:
    """A super-resolution checkpoint: ``upscale(images, captions)``."""

    def __init__(self, model: SuperResModel, vq_tokenizer: VQTokenizer, text_tokenizer):
        if model.vocab.num_codes != vq_tokenizer.codebook_size:
            raise ValueError(f"the model draws {model.vocab.num_codes} codes, the tokenizer has {vq_tokenizer.codebook_size}")
        self.model = model.eval()
        self.vq_tokenizer = vq_tokenizer.eval()
        self.text_tokenizer = text_tokenizer
        self.lowres = [parse_size(r) for r in model.config.lowres]

    @classmethod
    def from_pretrained(cls, directory: str | Path, llm_path: str | None = None, device: str | torch.device = "cpu") -> SuperResPipeline:
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"super-resolution checkpoint directory {directory} does not exist")
        for name in ("tokenizer", "text_tokenizer"):
            if not (directory / name).is_dir():
                raise FileNotFoundError(f"{directory} is not a super-resolution checkpoint (SuperResModule.export): no {name}/")
        return cls(
            SuperResModel.from_pretrained(directory, llm_path=llm_path).to(device),
            VQTokenizer.from_pretrained(directory / "tokenizer", device=device),
            AutoTokenizer.from_pretrained(directory / "text_tokenizer"),
        )

    @torch.no_grad()
    def upscale(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        tokens_per_step: int = 1,
        mode: str = "exact",
        cfg_scale: float = 1.5,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        progress: bool = False,
    ) -> tuple[list[Image.Image], DecodeStats]:
        """One high-res image per (image, caption); images at a low-res size the model reads."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        f = self.vq_tokenizer.downsample
        device = self.model.hires_embedding.device
        stats = DecodeStats()
        out: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            if image.size not in self.lowres:
                known = ", ".join(resolution_text(*r) for r in self.lowres)
                raise ValueError(f"image {i} is {resolution_text(*image.size)}: this super-resolution model reads {known}")
            by_size.setdefault(image.size, []).append(i)
        bar = tqdm(total=len(images), desc="super-resolving", unit="image", disable=not progress)
        for size, indices in by_size.items():
            width, height = hires_size(*size, self.model.config.long_side, f)
            rows, columns = code_grid(width, height, f)
            slots = image_slots(rows, columns, self.model.vocab, row_end=True)
            uncond_text = encode_prompt(self.text_tokenizer, "", (width, height))
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                low = self.encode([images[i] for i in chunk])
                cond = collate([self.model.prompt_ids(encode_prompt(self.text_tokenizer, captions[i], (width, height)), c) for i, c in zip(chunk, low)], self.model.vocab)
                unc = collate([self.model.prompt_ids(uncond_text, c) for c in low], self.model.vocab)
                tokens, run = decode(
                    self.model, cond["input_ids"].to(device), slots, cond["attention_mask"].to(device),
                    tokens_per_step=tokens_per_step, mode=mode, uncond_ids=unc["input_ids"].to(device),
                    uncond_attention_mask=unc["attention_mask"].to(device), cfg_scale=cfg_scale, temperature=temperature,
                    top_k=top_k, top_p=top_p, generator=[torch.Generator(device=device).manual_seed(seed + i) for i in chunk],
                )
                stats.forward_passes += run.forward_passes
                stats.tokens += run.tokens * len(chunk)
                stats.accepted += run.accepted
                stats.seconds += run.seconds
                codes = torch.stack([codes_from_ids(row, rows, columns, self.model.vocab) for row in tokens.cpu()])
                for i, image in zip(chunk, to_pil(self.vq_tokenizer.decode(codes))):
                    out[i] = image
                bar.update(len(chunk))
        bar.close()
        return out, stats

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The low-res codes (B, rows, columns) of images of one size, as the model reads them."""
        return self.vq_tokenizer.encode(lowres_input(from_pil(images), self.model.config.lowres_scale)).cpu()


class Cascade:
    """Text -> base image -> high-res image: ``generate(prompts)`` returns both and the statistics."""

    def __init__(self, base: MarsPipeline, superres: SuperResPipeline):
        self.base = base
        self.superres = superres

    @classmethod
    def from_pretrained(cls, base_dir, superres_dir, llm_path=None, device="cpu") -> Cascade:
        return cls(MarsPipeline.from_pretrained(base_dir, llm_path, device), SuperResPipeline.from_pretrained(superres_dir, llm_path, device))

    def generate(
        self, prompts: Sequence[str], tokens_per_step: int = 1, mode: str = "exact", seed: int = 0, batch_size: int = 8,
        progress: bool = False, resolution: str | Sequence[int] | None = None, kv_cache: bool = True, **sampling,
    ):
        """(base images, high-res images, DecodeStats); ``resolution`` and ``kv_cache``: the base
        images' size (the high-res size follows from it) and whether they are drawn on the KV
        cache (``MarsPipeline.generate``; stage III always decodes on it); ``sampling`` (cfg_scale,
        temperature, top_k, top_p; None: the base checkpoint's defaults) applies to both steps."""
        if mode not in MODES:  # refused before the base images are drawn
            raise ValueError(f"decode={mode!r}: choose one of {', '.join(MODES)}")
        if not 1 <= tokens_per_step <= self.superres.model.num_heads:
            raise ValueError(f"tokens_per_step={tokens_per_step}: the super-resolution model has heads 1..{self.superres.model.num_heads}")
        base = self.base.generate(list(prompts), seed=seed, batch_size=batch_size, progress=progress, resolution=resolution, kv_cache=kv_cache, **sampling)
        defaults = self.base.sampling
        options = {k: getattr(defaults, k) if sampling.get(k) is None else sampling[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}
        high, stats = self.superres.upscale(base, list(prompts), tokens_per_step, mode, seed=seed, batch_size=batch_size, progress=progress, **options)
        return base, high, stats

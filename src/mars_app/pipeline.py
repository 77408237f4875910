"""MarsPipeline: a trained MARS model as one directory; text -> images, images -> captions.

A MARS checkpoint directory (``save_pretrained`` / ``from_pretrained``)::

    mars.json         {"format": "mars-pipeline", "resolutions": ["64x64", ...],
                       "resolution_in_prompt": false, "row_end": false, "plan": false,
                       "sampling": {"cfg_scale": ..., "temperature": ..., "top_k": ..., "top_p": ...}}
    semvie/           SemVIEForCausalLM.save_pretrained: the visual experts, embeddings and
                      vision head; the frozen text LLM is referenced by its path (or, when it
                      was built in memory or trained, written to semvie/llm)
    tokenizer/        VQTokenizer.save_pretrained: the image tokenizer
    text_tokenizer/   the text LLM's Hugging Face tokenizer (save_pretrained)

``mars.json`` also lists the sha256 of every other file of the directory (``"sha256"``);
``from_pretrained`` checks them before loading anything, so a changed, truncated or bit-flipped
file is refused with an error naming it. Weights are safetensors files: loading runs no code.

Design choices:
- Prompts and captioning inputs are built only with ``mars_semvie.sequences`` (the layouts
  training uses); sampling is ``mars_semvie.sampling.generate``.
- Resolutions are ``"WxH"`` in pixels, width first, as written into stage II prompts. The
  first one is the default. A stage I model has one (its square training size); a stage II
  model lists the sizes it was trained on, writes the requested one into the prompt
  (``resolution_in_prompt``) and ends every row of codes with ``<image_row_end>``
  (``row_end``). A size the model was not trained on is refused.
- The row ends and ``<image_end>`` are placed, not sampled (``sequences.image_slots``): the
  requested grid decides them, and only visual codes are drawn elsewhere.
- Prompt i of a call draws with the generator seeded ``seed + i``, so its image does not depend
  on ``batch_size`` or on the other prompts of the call.
- Plans (``plan``): the model first continues each prompt with text (greedy, text ids only,
  until ``<|endoftext|>``; text-only input runs exactly the frozen LLM), and the image is
  drawn after that text, as in training (``mars_semvie.sequences``). The unconditional row of
  guidance has no plan.
- Captions: an image of any size is fitted to the trained resolution of the nearest aspect
  ratio (``prepare``: resize to cover, centre crop, as training does), encoded with the VQ
  tokenizer, fed as ``<image_start> codes <image_end>``, and text ids only are drawn (greedy
  by default) until ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mars_core.io import checksums, verify_checksums, write_json_atomic
from mars_data.images import parse_resolution, prepare_image
from mars_semvie import SemVIEForCausalLM
from mars_semvie.sampling import generate as sample_tokens
from mars_semvie.sequences import (
    PROMPT_LAYOUT,
    check_prompt_layout,
    caption_prompt_ids,
    code_grid,
    codes_from_ids,
    collate,
    encode_prompt,
    image_slots,
    resolution_ids,
    resolution_text,
    t2i_prompt_ids,
    unconditional_prompt,
)
from mars_semvie.vocab import ENDOFTEXT
from mars_tokenizer import VQTokenizer

FORMAT = "mars-pipeline"
CONFIG_NAME = "mars.json"
SEMVIE_DIR, TOKENIZER_DIR, TEXT_TOKENIZER_DIR = "semvie", "tokenizer", "text_tokenizer"


@dataclass
class SamplingDefaults:
    """Sampling options a checkpoint recommends; every call may override them."""

    cfg_scale: float = 1.5  # classifier-free guidance; 1 = none (DESIGN.md: 1.5 helped, 3 hurt)
    temperature: float = 0.0  # 0 = greedy (DESIGN.md: greedy beat top-k 32 on the shapes world)
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut


class MarsPipeline:
    """SemVIE + VQ tokenizer + text tokenizer: ``generate(prompts)`` and ``caption(images)``."""

    def __init__(
        self,
        model: SemVIEForCausalLM,
        vq_tokenizer: VQTokenizer,
        text_tokenizer,
        resolutions: Sequence[str | Sequence[int]] = ("64x64",),
        resolution_in_prompt: bool = False,
        row_end: bool = False,
        sampling: SamplingDefaults | dict | None = None,
        plan: bool = False,
    ):
        if model.vocab.num_codes != vq_tokenizer.codebook_size:
            raise ValueError(
                f"the model draws {model.vocab.num_codes} visual codes, the tokenizer has {vq_tokenizer.codebook_size}"
            )
        self.resolutions = [parse_resolution(r) for r in resolutions]
        if not self.resolutions:
            raise ValueError("a pipeline needs at least one resolution")
        for width, height in self.resolutions:
            code_grid(width, height, vq_tokenizer.downsample)  # refuses sizes the tokenizer cannot make
        self.model = model.eval()
        self.vq_tokenizer = vq_tokenizer.eval()
        self.text_tokenizer = text_tokenizer
        self.vocab = model.vocab
        self.resolution_in_prompt = resolution_in_prompt
        self.row_end = row_end
        self.plan = plan
        self.sampling = sampling if isinstance(sampling, SamplingDefaults) else SamplingDefaults(**(sampling or {}))
        self.eot = text_tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        # text ids a caption may use: the tokenizer's entries that the LLM has rows for
        self.text_ids = slice(0, min(len(text_tokenizer), self.vocab.text_size))

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, llm_path: str | None = None) -> Path:
        """Write the checkpoint directory (see the module docstring); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / SEMVIE_DIR, llm_path=llm_path)
        self.vq_tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        self.text_tokenizer.save_pretrained(directory / TEXT_TOKENIZER_DIR)
        config = {
            "format": FORMAT,
            "resolutions": [resolution_text(*r) for r in self.resolutions],
            "resolution_in_prompt": self.resolution_in_prompt,
            "prompt_layout": PROMPT_LAYOUT,
            "row_end": self.row_end,
            "plan": self.plan,
            "sampling": asdict(self.sampling),
        }
        files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != CONFIG_NAME]
        config["sha256"] = checksums(directory, files)
        write_json_atomic(directory / CONFIG_NAME, config)  # last: a directory with mars.json is complete
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, llm_path: str | None = None, device: str | torch.device = "cpu"
    ) -> MarsPipeline:
        """Load a ``save_pretrained`` directory; ``llm_path`` overrides where the text LLM is read."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"MARS checkpoint directory {directory} does not exist")
        expected = [CONFIG_NAME, SEMVIE_DIR, TOKENIZER_DIR, TEXT_TOKENIZER_DIR]
        missing = [name for name in expected if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a MARS checkpoint (MarsPipeline.save_pretrained): missing {', '.join(missing)}"
            )
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} is not a {FORMAT} config (format={config.get('format')!r})")
        if "sha256" not in config:
            warnings.warn(f"{directory / CONFIG_NAME} lists no sha256 (saved before checksums): files not verified")
        verify_checksums(directory, config.get("sha256", {}), directory / CONFIG_NAME)
        if config["resolution_in_prompt"]:
            check_prompt_layout(config.get("prompt_layout"), directory / CONFIG_NAME)
        text_tokenizer = directory / TEXT_TOKENIZER_DIR / "tokenizer.json"
        if not text_tokenizer.is_file():  # transformers would blame a missing sentencepiece/tiktoken
            raise FileNotFoundError(f"{text_tokenizer} is missing: the text tokenizer of this checkpoint is incomplete")
        model = SemVIEForCausalLM.from_pretrained(directory / SEMVIE_DIR, llm_path=llm_path).to(device)
        return cls(
            model,
            VQTokenizer.from_pretrained(directory / TOKENIZER_DIR, device=device),
            AutoTokenizer.from_pretrained(directory / TEXT_TOKENIZER_DIR),
            resolutions=config["resolutions"],
            resolution_in_prompt=config["resolution_in_prompt"],
            row_end=config["row_end"],
            sampling=config["sampling"],
            plan=config.get("plan", False),
        )

    # --------------------------------------------------------------------------- generate
    def resolution(self, resolution: str | Sequence[int] | None = None) -> tuple[int, int]:
        """The (width, height) to draw at: the default (first) one, or a trained one by name."""
        if resolution is None:
            return self.resolutions[0]
        size = parse_resolution(resolution)
        if size not in self.resolutions:
            known = ", ".join(resolution_text(*r) for r in self.resolutions)
            raise ValueError(f"unknown resolution {resolution_text(*size)}: this model draws {known}")
        return size

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        cfg_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        kv_cache: bool = True,
        resolution: str | Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """One image per prompt, in order. Options left None take the checkpoint's defaults."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {index} is empty: write what to draw (the empty prompt is the unconditional one)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        defaults = self.sampling
        options = dict(
            cfg_scale=defaults.cfg_scale if cfg_scale is None else cfg_scale,
            temperature=defaults.temperature if temperature is None else temperature,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            kv_cache=kv_cache,
        )
        width, height = self.resolution(resolution)
        rows, columns = code_grid(width, height, self.vq_tokenizer.downsample)
        slots = image_slots(rows, columns, self.vocab, self.row_end)
        in_prompt = (width, height) if self.resolution_in_prompt else None
        uncond = t2i_prompt_ids(unconditional_prompt(self.text_tokenizer, in_prompt), self.vocab)
        device = self.model.visual_embed.weight.device

        images = []
        bar = tqdm(total=len(prompts), desc="generating", unit="image", disable=not progress)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            text = [encode_prompt(self.text_tokenizer, p) for p in chunk]
            if self.plan:
                text = self.write_plans(text, kv_cache)
            text = [ids + resolution_ids(self.text_tokenizer, in_prompt) for ids in text]  # the resolution ends the prompt
            cond = collate([t2i_prompt_ids(ids, self.vocab) for ids in text], self.vocab)
            unc = collate([uncond] * len(chunk), self.vocab)
            generators = [torch.Generator(device=device).manual_seed(seed + start + i) for i in range(len(chunk))]
            tokens = sample_tokens(
                self.model,
                cond["input_ids"].to(device),
                len(slots),
                cond["attention_mask"].to(device),
                uncond_ids=unc["input_ids"].to(device),
                uncond_attention_mask=unc["attention_mask"].to(device),
                allowed_ids=self.vocab.code_ids,
                forced=slots,
                image_grid=(rows, columns),
                generator=generators,
                **options,
            )
            codes = torch.stack([codes_from_ids(row, rows, columns, self.vocab) for row in tokens.cpu()])
            images.extend(to_pil(self.vq_tokenizer.decode(codes)))
            bar.update(len(chunk))
        bar.close()
        return images

    def write_plans(self, prompts: list[list[int]], kv_cache: bool = True, max_new_tokens: int = 32) -> list[list[int]]:
        """Each prompt's ids followed by the text the model writes after it (greedy) and ``<|endoftext|>``."""
        batch = collate(prompts, self.vocab)
        device = self.model.visual_embed.weight.device
        tokens = sample_tokens(
            self.model,
            batch["input_ids"].to(device),
            max_new_tokens,
            batch["attention_mask"].to(device),
            allowed_ids=self.text_ids,
            eos_id=self.eot,
            kv_cache=kv_cache,
        )
        return [ids + self._until_eot(row) + [self.eot] for ids, row in zip(prompts, tokens.tolist())]

    def _until_eot(self, row: list[int]) -> list[int]:
        return row[: row.index(self.eot)] if self.eot in row else row

    # ---------------------------------------------------------------------------- caption
    @torch.no_grad()
    def caption(
        self,
        images: Image.Image | Iterable[Image.Image],
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        max_new_tokens: int = 48,
        kv_cache: bool = True,
        progress: bool = False,
    ) -> list[str]:
        """One caption per image of any size (``prepare``d to a trained resolution), greedy by default."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        device = self.model.visual_embed.weight.device
        captions = []
        bar = tqdm(total=len(images), desc="captioning", unit="image", disable=not progress)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            grids = [self.encode(image) for image in chunk]
            prompts = [caption_prompt_ids(codes, self.vocab, self.row_end) for codes in grids]
            batch = collate(prompts, self.vocab)
            tokens = sample_tokens(
                self.model,
                batch["input_ids"].to(device),
                max_new_tokens,
                batch["attention_mask"].to(device),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                allowed_ids=self.text_ids,
                eos_id=self.eot,
                generator=[torch.Generator(device=device).manual_seed(seed + start + i) for i in range(len(chunk))],
                kv_cache=kv_cache,
                image_grid=[tuple(codes.shape) for codes in grids],
            )
            for row in tokens.tolist():
                captions.append(self.text_tokenizer.decode(self._until_eot(row), skip_special_tokens=True).strip())
            bar.update(len(chunk))
        bar.close()
        return captions

    def prepare(self, image: Image.Image) -> Image.Image:
        """An image of any size as the model reads it: fitted to the trained resolution of the
        nearest aspect ratio (resize to cover, centre crop), as training prepares images."""
        return prepare_image(image.convert("RGB"), self.resolutions)

    def encode(self, image: Image.Image) -> torch.Tensor:
        """The (rows, columns) code grid of an image, prepared to a trained resolution first."""
        return self.vq_tokenizer.encode(from_pil([self.prepare(image)]))[0].cpu()


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float images (B, 3, H, W) in [-1, 1], as the VQ tokenizer reads them."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1 for image in images])).permute(0, 3, 1, 2)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images (B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

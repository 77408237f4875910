"""MARS stage III training: the super-resolution model with next-K-token prediction (Lightning).

``SuperResModule`` starts from a stage II MARS checkpoint directory (``base_path``: ``semvie/``,
``tokenizer/``, ``text_tokenizer/``, ``mars.json`` as ``mars_app.pipeline.MarsPipeline``
writes it; read here by its layout, without importing the application), builds
``SuperResModel`` around its SemVIE and trains on triplet batches (``data=superres_triplets``:
``batch["codes"]`` high-res, ``batch["lowres_codes"]``, ``batch["caption"]``).

Design choices:
- **Sequences** built in the DataLoader workers (``TripletSequences``, the datamodule's batch
  stage) from ``build_triplet`` (``mars_semvie.sequences``): the high-res size
  (its code grid times the tokenizer's downsampling) written into the prompt as in stage II;
  the caption is dropped to the unconditional prompt with probability ``uncond_prob`` (the
  low-res image stays: guidance then amplifies the caption), drawn from the data stream's
  seeded generator so a resumed run repeats the draws.
- **Optimizer**: AdamW (``optimizer``, partial) over the trainable weights only (visual
  experts, embeddings, vision head, K-1 heads, type embedding, hint tables), built by
  ``mars_core.schedule.build_optimizer``: no weight decay on norms, biases and embeddings; the
  parts stage III adds from zero (``NEW_PARTS``) at ``new_params_lr_scale`` times the
  learning rate, as stage I's new parts. Schedule: ``mars_core.schedule.warmup_cosine_scheduler``.
- **No EMA** here: the paper reports none for stage III, and ZeRO-3 (its strategy) shards
  the weights.
- **Export** (``export_dir``, at the end of training): ``SuperResModel.save_pretrained``
  (``superres_config.json`` with K_max, long side and low-res sizes; ``superres.safetensors``;
  ``semvie/``) plus the VQ ``tokenizer/`` (``tokenizer_path``'s, else the base's) and the base's
  ``text_tokenizer/``, so the directory alone
  runs the cascade's second step.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from mars_core import require_path
from mars_core.schedule import build_optimizer, warmup_cosine_scheduler
from mars_semvie import sequences as seq
from mars_superres.model import SuperResConfig, SuperResModel, build_triplet, parse_size

TOKENIZER_DIR, TEXT_TOKENIZER_DIR, BASE_CONFIG = "tokenizer", "text_tokenizer", "mars.json"
# what stage III adds from zero (the base's parts start trained): the high-res type embedding, the hint tables
NEW_PARTS = ("hires_embedding", "hint_embedding", "head_hint_embedding")


def read_base(base_path: str | Path) -> dict:
    """The base checkpoint's ``mars.json``, after checking the directory's layout."""
    base = require_path("model.base_path", base_path, "a stage II MARS checkpoint directory (<run dir>/mars)")
    missing = [n for n in (BASE_CONFIG, "semvie", TOKENIZER_DIR, TEXT_TOKENIZER_DIR) if not (base / n).exists()]
    if missing:
        raise FileNotFoundError(f"model.base_path={base} is not a MARS checkpoint directory: missing {', '.join(missing)}")
    return json.loads((base / BASE_CONFIG).read_text())


class TripletSequences:
    """The datamodule's batch stage for triplet batches (run in the DataLoader workers): adds the
    training sequences, the caption dropped with probability ``uncond_prob``. Draws come from
    the data stream's generator (seeded by seed, epoch, rank and worker), so a resumed run
    draws what the first run drew."""

    def __init__(self, text_tokenizer, vocab, downsample: int, uncond_prob: float, seed: int = 0, lowres: tuple = (), lowres_scale: int = 1):
        # prompt ids (the high-res size written in) from the stage I/II builder's bounded cache
        self.prompts = seq.SequenceBuilder(text_tokenizer, vocab, downsample, resolution_in_prompt=True)
        self.vocab, self.downsample, self.uncond_prob, self.seed = vocab, downsample, uncond_prob, seed
        self.lowres, self.lowres_scale = [parse_size(r) for r in lowres], lowres_scale

    def check_scale(self, grid: torch.Size) -> None:
        """A low-res grid that is one of the model's low-res sizes read at another scale: the
        triplets were made with another ``lowres_scale`` than the model's (other grids pass:
        the low-res sizes the cascade reads are checked there)."""
        rows, columns = grid
        f = self.downsample
        scales = {rows * f // h for w, h in self.lowres if rows * f % h == 0 and rows * w == columns * h}
        if scales and self.lowres_scale not in scales:
            raise ValueError(
                f"a triplet's low-res grid is {rows}x{columns} codes: its image was encoded at lowres_scale={min(scales)}, "
                f"the model reads model.lowres_scale={self.lowres_scale} (apps/superres_shards.py lowres_scale=...)"
            )

    def build(self, batch: dict, rng: random.Random) -> dict[str, torch.Tensor]:
        if "lowres_codes" not in batch or "codes" not in batch:
            raise KeyError("super-resolution batches need codes and lowres_codes (data=superres_triplets)")
        self.check_scale(batch["lowres_codes"].shape[-2:])  # one grid per batch: the codes are stacked
        ids, labels = [], []
        for high, low, caption in zip(batch["codes"].cpu(), batch["lowres_codes"].cpu(), batch["caption"]):
            size = (high.shape[1] * self.downsample, high.shape[0] * self.downsample)  # (width, height)
            text = "" if rng.random() < self.uncond_prob else caption
            x, y = build_triplet(self.prompts.prompt_ids(text, size), low, high, self.vocab)
            ids.append(x)
            labels.append(y)
        return seq.collate(ids, self.vocab, labels)

    def __call__(self, batches, skips=None, rng: random.Random | None = None):
        rng = rng or random.Random(self.seed)
        for batch in batches:
            yield {**batch, **self.build(batch, rng)}


class SuperResModule(L.LightningModule):
    def __init__(
        self,
        base_path: str,  # a stage II MARS checkpoint directory (MarsPipeline.save_pretrained)
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: param groups -> optimizer
        tokens_per_step: int = 4,  # K_max: heads trained
        head_weights: list[float] | None = None,  # loss weight per head; None: all 1
        head1_share: float | None = None,  # instead of head_weights: head 1's share of the summed weights, the others 1 each
        long_side: int = 1024,  # high-res long side in pixels
        image_positions: int = 0,  # learned image-offset rows (>= high-res tokens + 1); 0: as the base
        aligned_hints: bool = False,  # the low-res code under each high-res target added to inputs and heads (SuperResModel; not the paper's)
        hint_radius: int = 0,  # with aligned_hints: also the low-res codes up to this many cells around it
        lowres_scale: int = 1,  # the low-res image encoded at this many times its size (the triplets' lowres_scale; not the paper's)
        uncond_prob: float = 0.1,
        gradient_checkpointing: bool = False,
        warmup_ratio: float = 0.01,
        min_lr_ratio: float = 0.1,
        new_params_lr_scale: float = 1.0,  # lr x this for the parts that start from zero (NEW_PARTS)
        llm_path: str | None = None,  # where the frozen LLM is, if it moved since the base was saved
        tokenizer_path: str | None = None,  # stage III's own VQ tokenizer (the triplets' codes; same codebook size); None: the base's
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        from mars_tokenizer import VQTokenizer

        base = read_base(base_path)
        if llm_path:
            require_path("model.llm_path", llm_path, "the base's text LLM directory, if it moved since the base was saved")
        self.base_path = Path(base_path)
        if head1_share is not None:
            if head_weights is not None:
                raise ValueError("set head_weights or head1_share, not both")
            if not 0 < head1_share < 1:
                raise ValueError(f"head1_share must be in (0, 1), got {head1_share}")
            rest = tokens_per_step - 1  # so any K_max keeps the share: 0.5 -> [7, 1, ..., 1] for 8 heads, [3, 1, 1, 1] for 4
            head_weights = [head1_share / (1 - head1_share) * rest if rest else 1.0] + [1.0] * rest
        config = SuperResConfig(tokens_per_step, head_weights, long_side, image_positions, list(base["resolutions"]), aligned_hints, hint_radius, lowres_scale)
        self.model = SuperResModel.from_base(base_path, config, llm_path=llm_path)
        self.model.semvie.gradient_checkpointing_enable(gradient_checkpointing)
        self.text_tokenizer = AutoTokenizer.from_pretrained(self.base_path / TEXT_TOKENIZER_DIR)
        # its own tokenizer can be finer than the base's: the cascade re-encodes the base image with
        # it, so the codes it reads can hold edges the base's codes lose (README). Only its
        # downsampling factor is needed while training (the shards hold codes).
        self.tokenizer_dir = (
            require_path("model.tokenizer_path", tokenizer_path, "stage III's VQ tokenizer directory (VQTokenizer.save_pretrained)")
            if tokenizer_path else self.base_path / TOKENIZER_DIR
        )
        vq = VQTokenizer.from_pretrained(self.tokenizer_dir)
        if vq.codebook_size != self.model.vocab.num_codes:
            raise ValueError(f"model.tokenizer_path={tokenizer_path} has {vq.codebook_size} codes; the base model draws {self.model.vocab.num_codes}")
        downsample = vq.downsample
        self.vocab = self.model.vocab
        self.optimizer = optimizer
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.new_params_lr_scale = new_params_lr_scale
        self.llm_path = llm_path
        self.export_dir = export_dir
        self.seed = seed
        self.triplets = TripletSequences(self.text_tokenizer, self.vocab, downsample, uncond_prob, seed, config.lowres, lowres_scale)

    def setup(self, stage: str) -> None:
        """Hand the sequence builder to the datamodule: batches arrive built by its workers."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "batch_stage"):
            datamodule.batch_stage = self.triplets

    def sequences(self, batch: dict, rng: random.Random) -> dict[str, torch.Tensor]:
        """The left-padded training batch of a triplet batch (what the workers add to it)."""
        return {k: v.to(self.device) for k, v in self.triplets.build(batch, rng).items()}

    def training_step(self, batch, batch_idx):
        inputs = seq.prebuilt(batch) or self.sequences(batch, random.Random(f"{self.seed}/{self.global_step}/{self.global_rank}"))
        out = self.model(**inputs)
        size = len(batch["caption"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        for k, loss in enumerate(out.head_losses, start=1):
            self.log(f"train/loss_head{k}", loss, batch_size=size)
        return out.loss

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer, self.model.named_parameters(), new_parts=NEW_PARTS, new_lr_scale=self.new_params_lr_scale)
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, path: str | Path) -> Path:
        """The super-resolution checkpoint directory (module docstring)."""
        path = Path(path)
        writer = self._trainer is None or self._trainer.is_global_zero  # also exported outside a fit
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):  # ZeRO-3: every rank gathers the shards
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                if writer:
                    self.model.save_pretrained(path, llm_path=self.llm_path)
        elif writer:
            self.model.save_pretrained(path, llm_path=self.llm_path)
        if writer:
            shutil.copytree(self.tokenizer_dir, path / TOKENIZER_DIR, dirs_exist_ok=True)
            shutil.copytree(self.base_path / TEXT_TOKENIZER_DIR, path / TEXT_TOKENIZER_DIR, dirs_exist_ok=True)
        return path

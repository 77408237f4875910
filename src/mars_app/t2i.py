"""MARS stages I and II: text-to-image and captioning with next-token prediction (Lightning).

``TextToImageModule`` loads a pretrained text LLM (a Hugging Face Qwen2 / Llama directory,
``llm_path``) and its tokenizer, wraps the LLM with SemVIE (frozen text expert, trainable
visual experts; ``visual_expert=False`` is the paper's ablation), and trains on batches of the
mars_data datamodules: pre-tokenized codes (``batch["codes"]``) or images encoded on the fly
with the VQ tokenizer (``tokenizer_path``). Sequences come from ``mars_semvie.sequences``.

Design choices:
- **Task mix per sample.** Each sample becomes a text-to-image sequence or a captioning
  sequence, drawn with the probabilities of ``task_mix``; a text-to-image prompt is dropped to
  the unconditional prompt with probability ``uncond_prob`` (classifier-free guidance). The
  draws come from a generator seeded by (seed, step, rank): a resumed run repeats them.
- **Caption targets** (``caption_target``): the sample's caption, or (``restatement``, the
  shapes world) its layout restatement in reading order, the text the shapes LLM was
  pretrained to write after a caption (``mars_app.lm_corpus``). The frozen text expert then
  continues an image with an output it already knows how to produce: with the raw captions
  (any of the grammar's forms) it gave every image the same caption (docs/LOG.md).
- **Plan** (``plan``; ``restatement``, the shapes world): a text-to-image prompt continues
  with the caption's layout restatement, the text the shapes LLM was pretrained to write after
  a caption, before ``<image_start>`` (``mars_semvie.sequences``); at generation the model
  writes it itself (text only: exactly the frozen LLM's continuation). The image then reads the
  objects in its reading order from explicit tokens (docs/LOG.md). Unconditional prompts
  have no plan.
- **Loss only on the targets** of each layout (image tokens; caption tokens and their eot),
  one cross-entropy over every target of the batch.
- **Stage II** (``resolution_in_prompt``): the image's size (its code grid times the
  tokenizer's downsampling) is written into the prompt and rows end with ``<image_row_end>``;
  batches are uniform in size (the datamodules bucket them), sequences of different sizes in
  different batches.
- **Optimizer**: AdamW over the trainable weights only; no weight decay on norms, biases and
  embeddings; the new parts (visual and image-position embeddings, vision head) may get a larger learning rate
  (``new_params_lr_scale``): they start from nothing while the experts start as copies of the
  text weights. The schedule is ``mars_core.schedule``'s (warm-up over ``warmup_ratio`` of
  the run, cosine decay to ``min_lr_ratio`` of the peak, following ``trainer.max_time`` too).
- **EMA** of the trainable weights (``ema_decay``; None: off), updated after every optimizer
  step, kept in fp32 and saved in checkpoints. Evaluation and export use the EMA weights. EMA
  needs whole parameters: under DeepSpeed ZeRO-3 (sharded parameters) it is off and the raw
  weights are exported.
- **Evaluation** (``evaluation``): generate the images of a held-out prompt file with the
  current (EMA) weights, score them with the shapes world's scorer and log
  ``eval/<lang>_<metric>`` every ``every_n_steps`` and at the end of training (the final
  numbers are put into ``trainer.callback_metrics``, which apps/train.py writes to
  metrics.json and sweeps tabulate). Generation is greedy with guidance ``cfg_scale``.
  Captioning is evaluated on the rendered scenes of the same file: ``eval/caption`` is the
  share of captions (either language) that name the right objects and relation.
- **Export**: at the end of training a MARS checkpoint directory (``mars_app.pipeline``:
  SemVIE weights, VQ tokenizer, text tokenizer, defaults) is written to ``export_dir``.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mars_core.schedule import warmup_cosine_scheduler
from mars_app.lm_corpus import parse_restatement, restate_caption
from mars_app.pipeline import MarsPipeline, parse_resolution
from mars_semvie import SemVIEForCausalLM
from mars_semvie import sequences as seq

NEW_PARTS = ("visual_embed", "image_position", "vision_head")  # SemVIE parameters that start from nothing


class TextToImageModule(L.LightningModule):
    def __init__(
        self,
        llm_path: str,  # Hugging Face causal LM directory (model + tokenizer): the text expert
        tokenizer_path: str,  # VQ tokenizer directory (VQTokenizer.save_pretrained)
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: param groups -> optimizer
        visual_expert: bool = True,  # False: the paper's "w/o visual expert" ablation
        image_positions: int = 0,  # learned offsets of image tokens from <image_start> (SemVIEConfig); 0: none
        num_visual_codes: int | None = None,  # None: the VQ tokenizer's codebook size
        task_mix: dict | None = None,  # {"t2i": p, "caption": q}, normalised
        caption_target: str = "caption",  # or "restatement" (the shapes world): what captioning learns to write
        plan: str | None = None,  # "restatement" (the shapes world): the LLM writes the layout before the image
        uncond_prob: float = 0.1,
        resolution_in_prompt: bool = False,  # stage II: resolution in the prompt, row ends
        resolutions: list[str] = ("64x64",),  # "WxH" the model draws (exported); the first is evaluated
        gradient_checkpointing: bool = False,
        warmup_ratio: float = 0.01,
        min_lr_ratio: float = 0.1,
        new_params_lr_scale: float = 1.0,
        ema_decay: float | None = 0.999,
        init_from: str | None = None,  # a SemVIE directory whose visual weights to start from (stage II)
        evaluation: dict | None = None,  # see the module docstring and conf/model/shapes_t2i.yaml
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mars_tokenizer import VQTokenizer

        llm = AutoModelForCausalLM.from_pretrained(llm_path)
        self.text_tokenizer = AutoTokenizer.from_pretrained(llm_path)
        # the VQ tokenizer is frozen and not part of the trained module (no checkpoint, no sharding)
        self._vq = [VQTokenizer.from_pretrained(tokenizer_path).eval().requires_grad_(False)]
        codes = num_visual_codes or self.vq.codebook_size
        if codes < self.vq.codebook_size:
            raise ValueError(f"num_visual_codes={codes} < the VQ tokenizer's codebook ({self.vq.codebook_size})")
        self.model = SemVIEForCausalLM.from_llm(llm, codes, visual_expert=visual_expert, image_positions=image_positions)
        if init_from:
            self.load_semvie_weights(init_from)
        self.model.gradient_checkpointing_enable(gradient_checkpointing)
        self.vocab = self.model.vocab
        mix = dict(task_mix or {"t2i": 1.0})
        unknown = set(mix) - {"t2i", "caption"}
        if unknown or not sum(mix.values()) > 0:
            raise ValueError(f"task_mix needs positive shares of 't2i' / 'caption', got {mix}")
        self.caption_prob = mix.get("caption", 0.0) / sum(mix.values())
        if caption_target not in ("caption", "restatement"):
            raise ValueError(f"caption_target must be 'caption' or 'restatement', got {caption_target!r}")
        self.caption_target = caption_target
        if plan not in (None, "restatement"):
            raise ValueError(f"plan must be null or 'restatement', got {plan!r}")
        self.plan = plan
        self.uncond_prob = uncond_prob
        self.resolution_in_prompt = resolution_in_prompt
        self.resolutions = list(resolutions)
        self.optimizer = optimizer
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.new_params_lr_scale = new_params_lr_scale
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] | None = None
        self.evaluation = dict(evaluation or {})
        self.export_dir = export_dir
        self.seed = seed
        self._prompt_cache: dict[tuple, list[int]] = {}

    @property
    def vq(self):
        return self._vq[0]

    def load_semvie_weights(self, path: str | Path) -> None:
        """Start from the SemVIE weights (visual experts, embeddings, head) of a save_pretrained dir."""
        from safetensors.torch import load_file

        from mars_semvie.model import WEIGHTS_NAME

        weights = load_file(Path(path) / WEIGHTS_NAME)
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise RuntimeError(f"{path}: missing {missing}, unexpected {unexpected}")

    # ------------------------------------------------------------------------- sequences
    def _prompt(self, caption: str, resolution: tuple[int, int] | None) -> list[int]:
        key = ("prompt", caption, resolution)
        if key not in self._prompt_cache:
            plan = restate_caption(caption) if self.plan and caption else None
            self._prompt_cache[key] = seq.encode_prompt(self.text_tokenizer, caption, resolution, plan)
        return self._prompt_cache[key]

    def _caption(self, caption: str) -> list[int]:
        key = ("caption", caption)
        if key not in self._prompt_cache:
            text = restate_caption(caption) if self.caption_target == "restatement" else caption
            self._prompt_cache[key] = seq.encode_caption(self.text_tokenizer, text)
        return self._prompt_cache[key]

    def resolution_of(self, codes: torch.Tensor) -> tuple[int, int] | None:
        """(width, height) in pixels of a code grid when stage II writes it into prompts."""
        if not self.resolution_in_prompt:
            return None
        rows, columns = codes.shape[-2:]
        return columns * self.vq.downsample, rows * self.vq.downsample

    def sequences(self, batch: dict, rng: random.Random) -> dict[str, torch.Tensor]:
        """The training batch (left-padded ids, mask, positions, labels) of a datamodule batch."""
        codes = batch.get("codes")
        if codes is None:
            with torch.no_grad():
                codes = self.vq.encode(batch["image"].to(self.vq_device))
        codes = codes.cpu()
        row_end = self.resolution_in_prompt
        ids, labels = [], []
        for grid, caption in zip(codes, batch["caption"]):
            if rng.random() < self.caption_prob:
                x, y = seq.build_caption(grid, self._caption(caption), self.vocab, row_end)
            else:
                text = "" if rng.random() < self.uncond_prob else caption
                x, y = seq.build_t2i(self._prompt(text, self.resolution_of(grid)), grid, self.vocab, row_end)
            ids.append(x)
            labels.append(y)
        out = seq.collate(ids, self.vocab, labels)
        return {k: v.to(self.device) for k, v in out.items()}

    @property
    def vq_device(self) -> torch.device:
        return next(self.vq.parameters()).device

    # -------------------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, return_logits=True):
        return self.model(input_ids, attention_mask, position_ids, labels, return_logits=return_logits)

    def training_step(self, batch, batch_idx):
        rng = random.Random(f"{self.seed}/{self.global_step}/{self.global_rank}")
        loss = self(**self.sequences(batch, rng), return_logits=False).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def configure_optimizers(self):
        decay, no_decay, new = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(NEW_PARTS):
                new.append(p)
            elif p.dim() < 2 or "embed" in name or "norm" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": new, "weight_decay": 0.0, "lr_scale": self.new_params_lr_scale},
        ]
        optimizer = self.optimizer([g for g in groups if g["params"]])
        for group in optimizer.param_groups:
            group["lr"] *= group.pop("lr_scale", 1.0)
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ------------------------------------------------------------------------------- EMA
    def _sharded(self) -> bool:
        return any(hasattr(p, "ds_id") for p in self.model.parameters())

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def on_fit_start(self) -> None:
        if self.ema_decay is not None and self._sharded():
            rank_zero_info("EMA is off: DeepSpeed ZeRO-3 shards the parameters (the raw weights are exported)")
            self.ema_decay = None
        if self.ema_decay is not None and self.ema is None:
            self.ema = {n: p.detach().float().clone() for n, p in self._trainable().items()}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self._trainable().items():
                    self.ema[name].lerp_(p.detach().float(), 1 - self.ema_decay)
        every = self.evaluation.get("every_n_steps")
        last = self.global_step == self.trainer.max_steps  # the final evaluation follows in on_train_end
        if every and self.global_step % every == 0 and not last:
            metrics = self.evaluate(self.evaluation.get("periodic_num"))
            self.log_dict(metrics, rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = {n: t.clone() for n, t in self.ema.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema = checkpoint["ema"]

    @contextmanager
    def ema_weights(self):
        """Swap the EMA weights into the model for the duration of the block (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self._trainable()
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num: int | None = None) -> dict[str, float]:
        """Shapes-world scores of generations and captions on the first ``num`` held-out prompts
        (default ``evaluation.num``), with the EMA weights. A missing prompt file is written
        with ``evaluation.seed``."""
        from mars_data import shapes

        cfg = self.evaluation
        path = Path(cfg["prompts"])
        num = num or cfg.get("num", 400)
        if not path.exists():
            shapes.write_prompts(path, max(num, cfg.get("num", 400)), cfg.get("seed", 9001))
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:num]
        batch_size = cfg.get("batch_size", 100)
        width, height = parse_resolution(self.resolutions[0])
        was_training = self.model.training
        try:
            with self.ema_weights():
                pipe = self.pipeline()
                options = dict(cfg_scale=cfg.get("cfg_scale", 1.5), temperature=0.0, batch_size=batch_size)
                images = pipe.generate([r["prompt"] for r in records], **options)
                rendered = [shapes.render(r["scene"], width, height) for r in records]
                captions = pipe.caption(rendered, batch_size=batch_size)
        finally:
            self.model.train(was_training)
        results = [shapes.score_image(image, record) for image, record in zip(images, records)]
        metrics = {}
        for lang, summary in shapes.summarize(results).items():
            for key in ("single_binding", "pair_binding", "spatial"):
                if summary.get(key) is not None:
                    metrics[f"eval/{lang}_{key}"] = float(summary[key])
        metrics["eval/caption"] = sum(map(caption_correct, captions, records)) / len(records)
        return metrics

    def on_train_end(self) -> None:
        if self.evaluation.get("prompts"):
            metrics = self.evaluate()
            rank_zero_info("final evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())))
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.global_step)
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, path: str | Path) -> None:
        """Write the MARS checkpoint directory (EMA weights) with the generation pipeline."""
        if self._sharded():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                if self.trainer.is_global_zero:
                    self.pipeline().save_pretrained(path)
            return
        if self.trainer.is_global_zero:
            with self.ema_weights():
                self.pipeline().save_pretrained(path)

    def pipeline(self):
        """The generation pipeline around this module's model and tokenizers (mars_app.pipeline)."""
        return MarsPipeline(
            self.model, self.vq, self.text_tokenizer, self.resolutions,
            resolution_in_prompt=self.resolution_in_prompt, row_end=self.resolution_in_prompt, plan=self.plan is not None,
            sampling={"cfg_scale": self.evaluation.get("cfg_scale", 1.5)},
        )


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def caption_correct(caption: str, record: dict) -> bool:
    """A caption (either language, or a restatement) names the record's objects and relation:
    "A left of B" and "B right of A" both describe the same scene."""
    from mars_data import shapes

    try:
        parsed = shapes.parse_caption(caption)["scene"]
    except ValueError:
        try:
            parsed = parse_restatement(caption)
        except ValueError:
            return False
    wanted = record["scene"]
    objects = [(o["color"], o["shape"]) for o in parsed["objects"]]
    target = [(o["color"], o["shape"]) for o in wanted["objects"]]
    if "relation" not in wanted:
        return objects == target and "relation" not in parsed
    return (objects, parsed.get("relation")) in ((target, wanted["relation"]), (target[::-1], INVERSE[wanted["relation"]]))


"""MARS stages I and II: text-to-image and captioning with next-token prediction (Lightning).

``TextToImageModule`` loads a pretrained text LLM (a Hugging Face Qwen2 / Llama directory,
``llm_path``) and its tokenizer, wraps the LLM with SemVIE (frozen text expert, trainable
visual experts; ``visual_expert=False`` is the paper's ablation), and trains on batches of the
mars_data datamodules: pre-tokenized codes (``batch["codes"]``) or images encoded on the fly
with the VQ tokenizer (``tokenizer_path``). Sequences come from ``mars_semvie.sequences``.

Design choices:
- **A generic core; worlds are plugins.** The module knows no data world. What a
  text-to-image prompt's plan is (``plan``: text the frozen LLM writes between the prompt and
  the image), what captioning learns to write (``caption_target``) and how generations are
  scored (``evaluator``) are injected by configuration: callables, or None. The shapes world's
  are in ``mars_data.shapes`` (conf/model/shapes_t2i.yaml: its layout restatement as plan and
  caption target, its detector as evaluator); the paper's stages use none of them.
- **Sequences are built in the DataLoader workers** (``mars_semvie.sequences.SequenceBuilder``,
  handed to the datamodule in ``setup``): task draws (``task_mix``), classifier-free guidance
  drops (``uncond_prob``), prompt ids and layouts. The training process only runs the model.
  Batches of images (no pre-tokenized codes) are encoded here with the VQ tokenizer and built
  with the same builder.
- **Loss only on the targets** of each layout (image tokens; caption tokens and their eot),
  one cross-entropy over every target of the batch.
- **Resolutions** (``resolutions``, "WxH"): the sizes the model trains on; the datamodules fit
  images to the nearest (``mars_data.images.prepare_image``) and a batch of codes of any other
  grid is skipped and counted. The sizes actually trained on are collected (and checkpointed)
  and exported, so generation accepts exactly them. Stage II (``resolution_in_prompt``): the
  image's size is written into the prompt and rows end with ``<image_row_end>``; batches are
  uniform in size (the datamodules bucket them). ``grid_heads``: each resolution's code grid
  draws through a vision head of its own, started from ``init_from``'s shared head.
- **Memory**: the LLM is loaded in ``llm_dtype`` (the paper's bf16 runs: ``bfloat16``, the
  precision DeepSpeed trains in anyway, half the host memory of fp32 while the model is built;
  DeepSpeed keeps fp32 master weights of the trainable parts), and the loss runs the heads on
  ``loss_chunk`` target positions at a time (no full 160k-wide fp32 logits). The model is
  built in ``configure_model``: under DeepSpeed ZeRO-3 inside ``zero.Init``, so each rank
  holds only its slice of the weights from the start.
- **Optimizer**: AdamW over the trainable weights only; no weight decay on norms, biases and
  embeddings; the new parts (visual and image-position embeddings, vision heads) may get a larger learning rate
  (``new_params_lr_scale``): they start from nothing while the experts start as copies of the
  text weights. The schedule is ``mars_core.schedule``'s (warm-up over ``warmup_ratio`` of
  the run, cosine decay to ``min_lr_ratio`` of the peak, following ``trainer.max_time`` too).
- **EMA** of the trainable weights (``ema_decay``; None: off), updated after every optimizer
  step, kept in fp32 and saved in checkpoints. Evaluation and export use the EMA weights. EMA
  needs whole parameters: under DeepSpeed ZeRO-3 (sharded parameters) it is off and the raw
  weights are exported.
- **Validation**: the same next-token loss on held-out shards (``data.val_shards``) with fixed
  task draws, logged as ``val/loss`` at Lightning's validation interval; in every stage.
- **Evaluation** (``evaluator``, a task plugin): called with the generation pipeline of the
  current (EMA) weights every ``evaluator.every_n_steps`` (on ``evaluator.periodic_num``
  prompts) and at the end of training; its metrics are logged and put into
  ``trainer.callback_metrics``, which apps/train.py writes to metrics.json and sweeps tabulate.
- **Export**: at the end of training a MARS checkpoint directory (``mars_app.pipeline``:
  SemVIE weights, VQ tokenizer, text tokenizer, defaults) is written to ``export_dir``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mars_app.pipeline import MarsPipeline
from mars_core import require_path
from mars_core.schedule import build_optimizer, warmup_cosine_scheduler
from mars_data.images import parse_resolution
from mars_semvie import SemVIEConfig, SemVIEForCausalLM
from mars_semvie.model import gathered, grid_name
from mars_semvie.sequences import SequenceBuilder, prebuilt

NEW_PARTS = ("visual_embed", "image_position", "grid_projection", "vision_head", "grid_heads")  # SemVIE parameters that start from nothing


@contextmanager
def hf_zero3(strategy) -> Iterator[None]:
    """With a DeepSpeed ZeRO-3 strategy, tell Hugging Face (its global DeepSpeed config) for the
    block, so ``from_pretrained`` loads into the ``zero.Init`` slices instead of full weights."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(strategy.config)  # noqa: F841 (held by a weak reference while it lives)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


class TextToImageModule(L.LightningModule):
    def __init__(
        self,
        llm_path: str,  # Hugging Face causal LM directory (model + tokenizer): the text expert
        tokenizer_path: str,  # VQ tokenizer directory (VQTokenizer.save_pretrained)
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: param groups -> optimizer
        visual_expert: bool = True,  # False: the paper's "w/o visual expert" ablation
        image_positions: int = 0,  # learned offsets of image tokens from <image_start> (SemVIEConfig); 0: none
        grid_features: int = 0,  # frequencies of image tokens' places as fractions of their grid (SemVIEConfig); 0: none
        grid_heads: bool = False,  # a vision head per resolution's code grid (SemVIEConfig.grid_heads), started from the shared one
        num_visual_codes: int | None = None,  # None: the VQ tokenizer's codebook size
        task_mix: dict | None = None,  # {"t2i": p, "caption": q}, normalised
        caption_target: Callable[[str], str] | None = None,  # caption -> what captioning writes (None: the caption)
        plan: Callable[[str], str] | None = None,  # caption -> the text the LLM writes before the image (None: no plan)
        evaluator: Callable[..., dict] | None = None,  # (pipeline, num) -> metrics, e.g. mars_data.shapes.ShapesEvaluator
        uncond_prob: float = 0.1,
        resolution_in_prompt: bool = False,  # stage II: resolution in the prompt, row ends
        resolutions: list[str] = ("64x64",),  # "WxH" the model draws (exported); the first is evaluated
        gradient_checkpointing: bool = False,
        llm_dtype: str = "float32",  # the LLM (and its expert copies) as loaded: "bfloat16" for bf16 trainers
        loss_chunk: int = 1024,  # target positions per head + loss chunk (SemVIEForCausalLM.target_loss)
        warmup_ratio: float = 0.01,
        min_lr_ratio: float = 0.1,
        new_params_lr_scale: float = 1.0,
        ema_decay: float | None = 0.999,
        init_from: str | None = None,  # a SemVIE directory whose visual weights to start from (stage II)
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        from mars_tokenizer import VQTokenizer

        if not isinstance(getattr(torch, llm_dtype, None), torch.dtype):
            raise ValueError(f"model.llm_dtype={llm_dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        require_path("model.llm_path", llm_path, "the text LLM: a Hugging Face causal LM directory with its tokenizer")
        require_path("model.tokenizer_path", tokenizer_path, "the VQ tokenizer's directory (<tokenizer run>/tokenizer)")
        if init_from:
            require_path("model.init_from", init_from, "a SemVIE directory to start from (<stage I run>/mars/semvie)")
        self.text_tokenizer = AutoTokenizer.from_pretrained(llm_path)
        # the VQ tokenizer is frozen and not part of the trained module (no checkpoint, no sharding)
        self._vq = [VQTokenizer.from_pretrained(tokenizer_path).eval().requires_grad_(False)]
        codes = num_visual_codes or self.vq.codebook_size
        if codes != self.vq.codebook_size:
            raise ValueError(
                f"model.num_visual_codes={codes} but the VQ tokenizer at {tokenizer_path} has "
                f"{self.vq.codebook_size} codes: leave it null to take the tokenizer's"
            )
        self.resolutions = list(resolutions)
        ds = self.vq.downsample
        grids = [(h // ds, w // ds) for w, h in map(parse_resolution, self.resolutions)]  # (rows, columns) of codes
        self.semvie_config = SemVIEConfig(
            AutoConfig.from_pretrained(llm_path).vocab_size, codes, visual_expert, image_positions=image_positions, grid_features=grid_features,
            grid_heads=[grid_name(*grid) for grid in grids] if grid_heads else [],
        )
        self.vocab = self.semvie_config.vocab
        self.llm_path, self.llm_dtype, self.init_from = llm_path, getattr(torch, llm_dtype), init_from
        self.gradient_checkpointing, self.loss_chunk = gradient_checkpointing, loss_chunk
        self.model: SemVIEForCausalLM | None = None  # configure_model builds it
        mix = dict(task_mix or {"t2i": 1.0})
        unknown = set(mix) - {"t2i", "caption"}
        if unknown or not sum(mix.values()) > 0:
            raise ValueError(f"task_mix needs positive shares of 't2i' / 'caption', got {mix}")
        self.plan = plan
        self.builder_options = dict(
            text_tokenizer=self.text_tokenizer,
            vocab=self.vocab,
            downsample=ds,
            grids=grids,
            caption_prob=mix.get("caption", 0.0) / sum(mix.values()),
            uncond_prob=uncond_prob,
            plan=plan,
            caption_target=caption_target,
            resolution_in_prompt=resolution_in_prompt,
            seed=seed,
        )
        self.builder = SequenceBuilder(**self.builder_options)
        self.resolution_in_prompt = resolution_in_prompt
        self.trained_resolutions: set[str] = set()
        self.optimizer = optimizer
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.new_params_lr_scale = new_params_lr_scale
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] | None = None
        self.evaluator = evaluator
        self.export_dir = export_dir
        self.seed = seed

    @property
    def vq(self):
        return self._vq[0]

    def configure_model(self) -> None:
        """Build SemVIE around the LLM (once). Lightning calls this inside its strategy's
        context: under DeepSpeed ZeRO-3 that is ``zero.Init``, so every weight is split across
        the ranks as it is made, and no rank ever holds the whole model (Hugging Face loads the
        checkpoint into the slices, rank 0 reading it). Outside a trainer (tools, tests) call it
        yourself. A model loaded in 16 bits for a 32-bit trainer (e.g. trainer=cpu with a paper
        experiment) is upcast: optimizer steps on bf16 weights lose updates."""
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        with hf_zero3(self._trainer.strategy if self._trainer else None):
            llm = AutoModelForCausalLM.from_pretrained(self.llm_path, dtype=self.llm_dtype)
            self.model = SemVIEForCausalLM(llm, self.semvie_config)
            if self.init_from:
                self.load_semvie_weights(self.init_from)
        self.model.gradient_checkpointing_enable(self.gradient_checkpointing)
        self.model.loss_chunk = self.loss_chunk
        precision = str(self._trainer.precision) if self._trainer else "32"
        if self.llm_dtype != torch.float32 and "16" not in precision and not self._sharded():
            rank_zero_info(f"model loaded in {self.llm_dtype} (model.llm_dtype), trainer.precision={precision}: upcast to float32")
            self.model.float()

    def load_semvie_weights(self, path: str | Path) -> None:
        """Start from the SemVIE weights (visual experts, embeddings, head) of a save_pretrained dir."""
        from safetensors.torch import load_file

        from mars_semvie.model import WEIGHTS_NAME

        weights = load_file(Path(path) / WEIGHTS_NAME)
        own = {n: p for n, p in self.model.named_parameters() if not n.startswith("llm.")}
        # a stage may add grid places (grid_features) to a checkpoint without them: they start at zero;
        # and grid heads: they start as the checkpoint's vision head
        for name in own:
            if name.startswith("grid_heads.") and name not in weights:
                weights[name] = weights["vision_head.weight"]
                rank_zero_info(f"{name}: not in {path}, starts as its vision head")
        missing = sorted(n for n in set(own) - set(weights) if not n.startswith("grid_projection"))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise RuntimeError(f"{path}: missing {missing}, unexpected {unexpected}")
        for name, param in own.items():
            if name not in weights:
                rank_zero_info(f"{name}: not in {path}, starts at zero")
                continue
            with gathered([param]), torch.no_grad():
                param.copy_(weights[name])

    # ------------------------------------------------------------------------- sequences
    def setup(self, stage: str) -> None:
        """Hand the sequence builders to the datamodule: batches arrive built by its workers."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "batch_stage"):
            datamodule.batch_stage = self.builder
            datamodule.val_batch_stage = SequenceBuilder(**self.builder_options, deterministic=True)

    def sequences(self, batch: dict, rng: random.Random) -> dict[str, torch.Tensor]:
        """The training sequences of a datamodule batch (images are encoded first)."""
        codes = batch.get("codes")
        if codes is None:
            with torch.no_grad():
                codes = self.vq.encode(batch["image"].to(self.vq_device))
            grid = tuple(codes.shape[-2:])
            if grid not in self.builder.grids:
                raise ValueError(f"images of {grid[1]}x{grid[0]} codes are not one of model.resolutions {self.resolutions}")
        out = self.builder.build(codes.cpu(), batch["caption"], rng)
        return {k: v.to(self.device) for k, v in out.items()}

    def _model_inputs(self, batch: dict, rng_key: str) -> dict[str, torch.Tensor]:
        return prebuilt(batch) or self.sequences(batch, random.Random(f"{self.seed}/{rng_key}/{self.global_rank}"))

    def _note_resolution(self, batch: dict) -> None:
        grid = batch["codes"].shape[-2:] if "codes" in batch else None
        if grid is not None:
            rows, columns = grid
            self.trained_resolutions.add(f"{columns * self.vq.downsample}x{rows * self.vq.downsample}")
        else:
            height, width = batch["image"].shape[-2:]
            self.trained_resolutions.add(f"{width}x{height}")

    @property
    def vq_device(self) -> torch.device:
        return next(self.vq.parameters()).device

    # -------------------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, return_logits=True, image_grid=None):
        return self.model(input_ids, attention_mask, position_ids, labels, return_logits=return_logits, image_grid=image_grid)

    def training_step(self, batch, batch_idx):
        self._note_resolution(batch)
        loss = self(**self._model_inputs(batch, f"train/{self.global_step}"), return_logits=False).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(**self._model_inputs(batch, f"val/{batch_idx}"), return_logits=False).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]), sync_dist=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer, self.model.named_parameters(), new_parts=NEW_PARTS, new_lr_scale=self.new_params_lr_scale)
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

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows every optimizer step here, before the callbacks' on_train_batch_end
        # (where checkpoints are saved): a checkpoint holds the EMA of the weights it holds
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self._trainable().items():
                    self.ema[name].lerp_(p.detach().float(), 1 - self.ema_decay)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = getattr(self.evaluator, "every_n_steps", None)
        last = self.global_step == self.trainer.max_steps  # the final evaluation follows in on_train_end
        if every and self.global_step % every == 0 and not last:
            metrics = self.evaluate(getattr(self.evaluator, "periodic_num", None))
            self.log_dict(metrics, rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = {n: t.clone() for n, t in self.ema.items()}
        checkpoint["trained_resolutions"] = sorted(self.trained_resolutions)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema = checkpoint["ema"]
        self.trained_resolutions = set(checkpoint.get("trained_resolutions", ()))

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
        """The evaluator's metrics for the current (EMA) weights (``num`` prompts: its default)."""
        was_training = self.model.training
        try:
            with self.ema_weights():
                return self.evaluator(self.pipeline(), num)
        finally:
            self.model.train(was_training)

    def on_train_end(self) -> None:
        if self.evaluator is not None:
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

    def exported_resolutions(self) -> list[str]:
        """The declared resolutions the run trained on (all declared ones before any step)."""
        seen = [r for r in self.resolutions if r in self.trained_resolutions]
        unseen = [r for r in self.resolutions if r not in self.trained_resolutions]
        if seen and unseen:
            rank_zero_info(f"not exported (no training batch had these sizes): {', '.join(unseen)}")
        return seen or self.resolutions

    def pipeline(self):
        """The generation pipeline around this module's model and tokenizers (mars_app.pipeline)."""
        return MarsPipeline(
            self.model, self.vq, self.text_tokenizer, self.exported_resolutions(),
            resolution_in_prompt=self.resolution_in_prompt, row_end=self.resolution_in_prompt, plan=self.plan is not None,
        )

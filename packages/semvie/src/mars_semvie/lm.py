"""Pretraining a small Hugging Face causal LM: the text expert of the shapes world.

``CausalLMModule`` builds a causal LM from a transformers config (a tiny Qwen2 for the shapes
world, see conf/model/shapes_lm.yaml), trains it with next-token prediction on the batches of
``TextDataModule`` (``input_ids``, ``labels`` with -100 on padding), and at the end of training
writes it with ``save_pretrained`` together with the datamodule's tokenizer to ``export_dir``.
That directory is then an ordinary Hugging Face checkpoint: ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(export_dir)`` and ``SemVIEForCausalLM.from_llm`` load it exactly
like a real Qwen checkpoint.

Validation logs the token-level ``val/loss`` and ``val/ppl`` (perplexity, exp of the mean
loss over every target token of the validation texts).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from mars_core.schedule import warmup_cosine_scheduler


class CausalLMModule(L.LightningModule):
    def __init__(
        self,
        config,  # a transformers PretrainedConfig (e.g. Qwen2Config), built by Hydra
        optimizer: Callable[..., torch.optim.Optimizer],  # partial: params -> optimizer
        warmup_ratio: float = 0.05,  # linear warm-up over this share of the steps, then cosine
        min_lr_ratio: float = 0.05,  # cosine decays to this fraction of the peak learning rate
        export_dir: str | None = None,  # save_pretrained(model + tokenizer) here after fit
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.llm = AutoModelForCausalLM.from_config(config)
        self.optimizer = optimizer
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.export_dir = export_dir
        self._val_sum = self._val_count = 0.0

    def setup(self, stage: str) -> None:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.llm.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} entries, more than the model's vocab_size "
                f"{self.llm.config.vocab_size}: raise model.config.vocab_size"
            )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.llm(input_ids=input_ids, labels=labels)

    def training_step(self, batch, batch_idx):
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        mask = targets.flatten() != -100
        self._val_sum += float(losses[mask].sum())
        self._val_count += int(mask.sum())

    def on_validation_epoch_end(self) -> None:
        if self._val_count:
            loss = self._val_sum / self._val_count
            self.log("val/loss", loss, prog_bar=True)
            self.log("val/ppl", math.exp(loss), prog_bar=True)
        self._val_sum = self._val_count = 0.0

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export(self.export_dir)

    def export(self, path: str | Path) -> None:
        """Write the LM (and the datamodule's tokenizer) as a Hugging Face checkpoint."""
        self.llm.save_pretrained(path)
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

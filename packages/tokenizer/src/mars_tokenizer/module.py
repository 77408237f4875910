"""Lightning module that trains a VQ-GAN tokenizer.

Design choices
--------------
- **Manual optimization, one optimizer, two parameter groups** (autoencoder, discriminator).
  The generator loss is back-propagated with the discriminator frozen, the discriminator loss
  on detached reconstructions, then one ``optimizer.step()`` updates both. So one batch is one
  optimizer step and ``trainer.global_step`` / ``max_steps`` count batches (with two optimizers
  Lightning 2 counts both steps). Adam keeps per-parameter state, so this equals two Adams.
- **Losses (taming's VQGAN recipe).** ``l1_weight * |x - x'| + l2_weight * (x - x')^2``
  (+ ``perceptual_weight * LPIPS`` only when ``perceptual_weights`` names a local file), the
  codebook and commitment losses, and from ``disc_start`` on a hinge PatchGAN loss weighted by
  ``disc_weight`` times taming's adaptive weight (ratio of the reconstruction and GAN gradient
  norms at the decoder's last layer). ``disc_weight=0`` builds no discriminator.
- **Dead codes.** With a learned codebook, every ``restart_every`` steps codes whose running
  usage fell below ``dead_code_threshold`` are moved onto encoder outputs of the batch, drawn
  by how badly the codebook fits them
  (rank 0 decides, the new codebook is broadcast); FSQ's implicit codebook needs none. ``train/codebook_live`` is the share of live codes,
  ``val/codebook_usage`` the share of codes used over the validation set. The running usage is
  training state, not part of the tokenizer: it is kept in the checkpoint beside the weights
  (``quantizer_usage``), so a resumed run restarts the same codes as an uninterrupted one.
- **Schedule.** Linear warm-up over ``warmup_steps``, then (with ``min_lr_ratio`` set) cosine
  decay to that fraction of the peak at the run's end (``mars_core.schedule``, shared by every stage): the last
  steps at a low learning rate sharpen edges, which the shapes world's scoring needs.
- **Channels-last** weights and images while training: the same convolutions, about 8% faster
  on a CPU (oneDNN); the saved tokenizer holds ordinary contiguous tensors.
- **The product is the tokenizer.** At the end of training the ``VQTokenizer`` is written with
  ``save_pretrained`` to ``save_dir`` (the app sets ``<run dir>/tokenizer``); later stages load
  it with ``VQTokenizer.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from mars_core.schedule import warmup_cosine_scheduler
from mars_tokenizer.losses import LPIPS, PatchDiscriminator, hinge_d_loss, hinge_g_loss
from mars_tokenizer.tokenizer import VQTokenizer
from mars_tokenizer.vqgan import VectorQuantizer, VQGANConfig, codebook_perplexity


class VQGANModule(L.LightningModule):
    def __init__(
        self,
        vqgan: VQGANConfig | Mapping,
        optimizer: Callable[[Iterable], torch.optim.Optimizer],
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        codebook_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_weights: str | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 10_000,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        restart_every: int = 50,
        dead_code_threshold: float = 0.01,
        grad_clip: float | None = 1.0,
        warmup_steps: int = 0,
        min_lr_ratio: float | None = None,
        save_dir: str | None = None,
    ):
        super().__init__()
        if isinstance(vqgan, Mapping):
            vqgan = VQGANConfig(**vqgan)
        self.save_hyperparameters(ignore=["optimizer", "vqgan"])
        # a plain dict: checkpoints then load with torch.load(weights_only=True), as resuming does
        self.hparams["vqgan"] = vqgan.to_dict()
        self.automatic_optimization = False
        self.tokenizer = VQTokenizer(vqgan)
        self.optimizer_factory = optimizer
        self.discriminator = (
            PatchDiscriminator(vqgan.in_channels, disc_ndf, disc_layers) if disc_weight > 0 else None
        )
        self.lpips = LPIPS.from_file(perceptual_weights) if perceptual_weights else None
        self.register_buffer("val_counts", torch.zeros(vqgan.codebook_size), persistent=False)

    @property
    def vqgan(self):
        return self.tokenizer.vqgan

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.vqgan.parameters())}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters())})
        optimizer = self.optimizer_factory(groups)
        hp = self.hparams
        if hp.min_lr_ratio is None and not hp.warmup_steps:
            return optimizer
        ratio = 1.0 if hp.min_lr_ratio is None else hp.min_lr_ratio  # None: constant after the warm-up
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, warmup_steps=max(1, hp.warmup_steps), min_lr_ratio=ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def reconstruction_loss(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hp = self.hparams
        l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
        loss = hp.l1_weight * l1 + hp.l2_weight * l2
        logs = {"l1": l1, "l2": l2}
        if self.lpips is not None:
            perceptual = self.lpips(x, rec).mean()
            loss = loss + hp.perceptual_weight * perceptual
            logs["perceptual"] = perceptual
        return loss, logs

    def adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor) -> torch.Tensor:
        last = self.vqgan.decoder.last_layer.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["quantizer_usage"] = self.vqgan.quantize.usage.detach().cpu().clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "quantizer_usage" in checkpoint:
            self.vqgan.quantize.usage.copy_(checkpoint["quantizer_usage"])

    def on_fit_start(self) -> None:
        self.to(memory_format=torch.channels_last)  # oneDNN's convolutions run faster on CPU (docs/LOG.md)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = batch["image"].contiguous(memory_format=torch.channels_last)
        out = self.vqgan(x)
        rec = out["reconstruction"]
        rec_loss, logs = self.reconstruction_loss(x, rec)
        loss = rec_loss + hp.codebook_weight * (out["codebook_loss"] + out["commitment_loss"])
        adversarial = self.discriminator is not None and self.global_step >= hp.disc_start
        if adversarial:
            self.discriminator.requires_grad_(False)
            gan_loss = hinge_g_loss(self.discriminator(rec))
            weight = hp.disc_weight * self.adaptive_weight(rec_loss, gan_loss)
            loss = loss + weight * gan_loss
            logs.update(g_loss=gan_loss, adaptive_weight=weight)

        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if adversarial:
            self.discriminator.requires_grad_(True)
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(rec.detach()))
            self.manual_backward(d_loss)
            logs["d_loss"] = d_loss
        if hp.grad_clip:
            for module in (self.vqgan, self.discriminator):
                if module is not None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), hp.grad_clip)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        restarts = hp.restart_every and isinstance(self.vqgan.quantize, VectorQuantizer)
        if restarts and (self.global_step + 1) % hp.restart_every == 0:
            self.log("train/restarted_codes", float(self.restart_dead_codes(out["latent"].detach())))
        # The diagnostics only after the batches whose metrics the loggers write (a multiple of
        # log_every_n_steps; global_step counts this batch once the optimizer stepped) and the
        # last: each value logged costs Lightning 0.2-0.25 ms a step on a CPU, these ten 3% of a
        # one-thread step
        step, trainer = self.global_step, self.trainer
        if step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps or trainer.should_stop:
            quantize = self.vqgan.quantize
            logs.update(
                loss=loss.detach(),
                codebook_loss=out["codebook_loss"],
                commitment_loss=out["commitment_loss"],
                codebook_live=(quantize.usage >= hp.dead_code_threshold).float().mean(),
                batch_codes_used=torch.tensor(out["codes"].unique().numel() / quantize.size),
            )
            self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, prog_bar=False)
        self.log("train/rec", rec_loss.detach(), prog_bar=True)
        return loss.detach()

    def restart_dead_codes(self, latent: torch.Tensor) -> int:
        quantize = self.vqgan.quantize
        restarted = quantize.restart_dead_codes(latent, self.hparams.dead_code_threshold)
        if self.trainer.world_size > 1:  # every rank must hold the same codebook: rank 0's
            weight, usage = self.trainer.strategy.broadcast((quantize.embedding.weight.data, quantize.usage), src=0)
            quantize.embedding.weight.data.copy_(weight)
            quantize.usage.copy_(usage)
        return restarted

    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"].contiguous(memory_format=torch.channels_last)
        codes = self.vqgan.encode_codes(x)
        rec = self.vqgan.decode_codes(codes).clamp(-1, 1)
        self.val_counts += torch.bincount(codes.flatten(), minlength=self.val_counts.numel()).float()
        self.log_dict({"val/l1": F.l1_loss(rec, x), "val/l2": F.mse_loss(rec, x)}, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self.val_counts, reduce_op="sum")
        if counts.sum() > 0:
            self.log("val/codebook_usage", (counts > 0).float().mean())
            self.log("val/codebook_perplexity", codebook_perplexity(counts))

    def on_train_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(Path(self.hparams.save_dir))

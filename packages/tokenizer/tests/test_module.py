"""VQGANModule: a few real optimisation steps of the tiny preset on tensors made here."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from mars_tokenizer import VQGANConfig, VQGANModule, VQTokenizer
from mars_tokenizer.losses import LPIPS, PatchDiscriminator, hinge_g_loss


class Squares(Dataset):
    """Batches shaped like mars_data's: {"image": [-1, 1] float (3, 16, 16), "caption": str}."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.ones(n, 3, 16, 16)
        for i in range(n):
            y, x = torch.randint(0, 10, (2,), generator=g).tolist()
            self.images[i, :, y : y + 6, x : x + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": "a square"}


def build_module(**overrides) -> VQGANModule:
    kwargs = dict(
        vqgan=VQGANConfig.from_preset("tiny"),
        optimizer=partial(torch.optim.Adam, lr=2e-3, betas=(0.5, 0.9)),
        disc_weight=0.5, disc_start=2, disc_ndf=8, disc_layers=2, restart_every=2,
    )
    return VQGANModule(**{**kwargs, **overrides})


def fit(module: VQGANModule, tmp_path, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=2, val_check_interval=steps, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    loader = DataLoader(Squares(), batch_size=8)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(Squares(16), batch_size=8))
    return trainer


def test_fit_updates_generator_and_discriminator_and_saves_the_tokenizer(tmp_path):
    torch.manual_seed(0)
    module = build_module(save_dir=str(tmp_path / "tokenizer"))
    encoder_before = module.vqgan.encoder.conv_in.weight.detach().clone()
    disc_before = module.discriminator.main[0].weight.detach().clone()
    trainer = fit(module, tmp_path)
    assert trainer.global_step == 4  # one optimizer step per batch
    assert not torch.equal(module.vqgan.encoder.conv_in.weight, encoder_before)
    assert not torch.equal(module.discriminator.main[0].weight, disc_before)  # adversarial from step 2
    metrics = trainer.callback_metrics
    for key in ("train/l1", "train/d_loss", "train/g_loss", "train/codebook_live", "val/l1", "val/codebook_usage"):
        assert key in metrics, key
    assert 0 < metrics["val/codebook_usage"] <= 1
    loaded = VQTokenizer.from_pretrained(tmp_path / "tokenizer")
    x = Squares(4).images
    assert torch.equal(loaded.encode(x), module.tokenizer.encode(x))


def test_training_resumes_from_a_checkpoint(tmp_path):
    trainer = fit(build_module(), tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = L.Trainer(accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    resumed.fit(build_module(), train_dataloaders=DataLoader(Squares(), batch_size=8), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert VQGANModule(**{**checkpoint["hyper_parameters"], "optimizer": torch.optim.Adam}).tokenizer.config == VQGANConfig.from_preset("tiny")


def test_discriminator_waits_for_disc_start_and_can_be_off(tmp_path):
    module = build_module(disc_start=100)
    disc_before = module.discriminator.main[0].weight.detach().clone()
    trainer = fit(module, tmp_path, steps=2)
    assert torch.equal(module.discriminator.main[0].weight, disc_before)
    assert "train/d_loss" not in trainer.callback_metrics
    assert build_module(disc_weight=0.0).discriminator is None


def test_adversarial_weight_reads_the_pixel_layer(tmp_path):
    """With per-pixel layers the layer that writes the pixels is pixel_out, not conv_out."""
    torch.manual_seed(0)
    module = build_module(vqgan=VQGANConfig.from_preset("tiny", patch_size=2, pixel_channels=4), disc_start=0)
    x = Squares(4).images * 1.0
    rec = module.vqgan(x)["reconstruction"]
    rec_loss, _ = module.reconstruction_loss(x, rec)
    gan_loss = hinge_g_loss(module.discriminator(rec))

    def ratio(layer):
        grads = [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].norm() for loss in (rec_loss, gan_loss)]
        return grads[0] / (grads[1] + 1e-4)

    decoder = module.vqgan.decoder
    weight = module.adaptive_weight(rec_loss, gan_loss)
    torch.testing.assert_close(weight, ratio(decoder.pixel_out))
    assert not torch.allclose(weight, ratio(decoder.conv_out))
    assert fit(module, tmp_path, steps=2).callback_metrics["train/adaptive_weight"] > 0


def test_training_reduces_the_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    module = build_module(disc_weight=0.0)
    x = Squares(16).images
    before = (module.tokenizer(x) - x).abs().mean()
    fit(module, tmp_path, steps=30)
    after = (module.tokenizer(x) - x).abs().mean()
    assert after < 0.7 * before


def test_perceptual_loss_is_built_only_from_a_local_file(tmp_path):
    assert build_module().lpips is None
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_module(perceptual_weights=str(tmp_path / "missing.safetensors"))
    torch.manual_seed(0)
    weights = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    save_file(weights, str(tmp_path / "lpips.safetensors"))
    module = build_module(perceptual_weights=str(tmp_path / "lpips.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert module.lpips(x, x).abs().max() == 0
    assert (module.lpips(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in module.lpips.parameters())
    trainer = fit(module, tmp_path, steps=1)
    assert "train/perceptual" in trainer.callback_metrics


def test_patch_discriminator_scores_patches():
    logits = PatchDiscriminator(3, ndf=8, n_layers=2)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)


def test_learning_rate_warms_up_then_decays_to_min_lr_ratio(tmp_path):
    module = build_module(disc_weight=0.0, warmup_steps=2, min_lr_ratio=0.1)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", max_steps=8, limit_val_batches=0, logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(Squares(64), batch_size=8))
    assert seen[0] == pytest.approx(1e-3) and seen[2] == pytest.approx(2e-3)  # warm-up from lr / warmup_steps
    assert all(a > b for a, b in zip(seen[2:], seen[3:]))  # then cosine decay
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-4)  # min_lr_ratio x lr at max_steps


def test_cosine_decay_needs_max_steps():
    module = build_module(disc_weight=0.0, min_lr_ratio=0.1)
    trainer = L.Trainer(accelerator="cpu", max_time="00:00:00:05", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(module, train_dataloaders=DataLoader(Squares(8), batch_size=8))

"""A tiny regression model and data to exercise the training machinery (strategies,
checkpointing, resuming, sweeps) on its own, independent of any MARS model."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyRegression(L.LightningModule):
    def __init__(self, dim: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TinyData(L.LightningDataModule):
    def __init__(self, dim: int = 8, num_samples: int = 256, batch_size: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(num_samples, dim, generator=generator)
        self.dataset = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)

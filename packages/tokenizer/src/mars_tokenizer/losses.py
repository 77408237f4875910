"""Training-only parts of the VQ-GAN: PatchGAN discriminator, hinge GAN losses, LPIPS.

- ``PatchDiscriminator`` is pix2pix's PatchGAN as taming uses it (BatchNorm, LeakyReLU 0.2),
  scoring overlapping patches rather than whole images.
- ``LPIPS`` is the learned perceptual metric (Zhang et al., 2018) on VGG16 features, with the
  module layout of taming's ``taming.modules.losses.lpips.LPIPS``: a state dict saved from that
  module (``net.slice*``, ``lin*``, ``scaling_layer.*``) loads into ours. It is only built from a
  local weights file; nothing is downloaded, and without a file the perceptual loss is off.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, h', w')."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


# VGG16 "features" up to relu5_3, as (torchvision index, layer); slices end at relu1_2 ... relu5_3
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICE_ENDS = (4, 9, 16, 23, 30)


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]; returns (B, 1, 1, 1). Weights are frozen."""

    channels = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        layers, in_ch = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.net = nn.Module()
        start = 0
        for i, end in enumerate(_SLICE_ENDS, 1):
            piece = nn.Sequential()
            for idx in range(start, end):
                piece.add_module(str(idx), layers[idx])
            self.net.add_module(f"slice{i}", piece)
            start = end
        for i, c in enumerate(self.channels):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            self.add_module(f"lin{i}", lin)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Weights from a local ``.safetensors`` or torch file with taming's LPIPS state dict keys."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual loss weights {path} do not exist (nothing is downloaded)")
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        model.load_state_dict(state)
        return model

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always in eval mode: dropout off, a fixed metric

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        hx, hy = (x - shift) / scale, (y - shift) / scale
        total = 0.0
        for i in range(len(self.channels)):
            piece = getattr(self.net, f"slice{i + 1}")
            hx, hy = piece(hx), piece(hy)
            diff = (_unit(hx) - _unit(hy)) ** 2
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

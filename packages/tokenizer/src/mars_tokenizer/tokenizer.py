"""VQTokenizer: images <-> code grids, saved as safetensors weights + a JSON config.

A directory written by ``save_pretrained`` holds ``config.json`` (the ``VQGANConfig``, a
format tag and the sha256 of the weights file) and ``model.safetensors`` (the VQ-GAN weights,
without training-only parts such as the discriminator). ``from_pretrained`` reads it back by
path, nothing is downloaded, and refuses weights whose sha256 differs (flipped bits, a
truncated copy) with an error naming the file. Weights are safetensors: loading runs no code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mars_core.io import atomic_path, checksums, verify_checksums, write_json_atomic

from mars_tokenizer.vqgan import VQGAN, VQGANConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mars-vqgan"


class VQTokenizer(nn.Module):
    """Encode float images in [-1, 1] to LongTensor codes (B, h, w) and decode them back."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.vqgan = VQGAN(config)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def code_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) code grid of a height x width image."""
        self._check_size(height, width)
        return height // self.downsample, width // self.downsample

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} is not a positive multiple of the tokenizer's "
                f"downsampling factor {f} (e.g. {max(f, height // f * f)}x{max(f, width // f * f)})"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [-1, 1] -> codes LongTensor (B, H/f, W/f)."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(
                f"encode expects a float tensor in [-1, 1], got "
                f"{type(images).__name__ if not isinstance(images, torch.Tensor) else images.dtype}"
            )
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode expects images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        self._check_size(images.shape[2], images.shape[3])
        if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
            raise ValueError(
                f"encode expects pixel values in [-1, 1], got [{images.min().item():.3g}, "
                f"{images.max().item():.3g}] (map uint8 x with x / 127.5 - 1)"
            )
        param = next(self.parameters())
        return self.vqgan.encode_codes(images.to(param.device, param.dtype))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w), integer dtype -> float images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(
                f"decode expects an integer tensor of codes, got "
                f"{type(codes).__name__ if not isinstance(codes, torch.Tensor) else codes.dtype}"
            )
        if codes.ndim != 3:
            raise ValueError(f"decode expects codes of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{codes.min().item()}, {codes.max().item()}]"
            )
        device = next(self.parameters()).device
        return self.vqgan.decode_codes(codes.to(device, torch.long)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images through the code bottleneck."""
        return self.decode(self.encode(images))

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.vqgan.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        config = {"format": FORMAT, "config": self.config.to_dict(), "sha256": checksums(directory, [WEIGHTS_NAME])}
        write_json_atomic(directory / CONFIG_NAME, config)  # last: a directory with a config is complete
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VQTokenizer":
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory} has no {name}: not a tokenizer saved by VQTokenizer.save_pretrained"
                )
        saved = json.loads((directory / CONFIG_NAME).read_text())
        if saved.get("format") != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} is not a {FORMAT} config (format={saved.get('format')!r})")
        if "sha256" not in saved:
            warnings.warn(f"{directory / CONFIG_NAME} lists no sha256 (saved before checksums): weights not verified")
        verify_checksums(directory, saved.get("sha256", {}), directory / CONFIG_NAME)
        tokenizer = cls(VQGANConfig(**saved["config"]))
        try:
            weights = load_file(str(directory / WEIGHTS_NAME))
        except SafetensorError as err:
            raise ValueError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file (truncated or corrupt?): {err}") from None
        tokenizer.vqgan.load_state_dict(weights)
        return tokenizer.to(device).eval()

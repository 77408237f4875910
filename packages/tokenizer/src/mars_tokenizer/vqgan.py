"""VQ-GAN autoencoder: convolutional encoder, vector quantizer, convolutional decoder.

Design choices
--------------
- **taming-transformers' architecture, module for module.** The encoder and decoder are the
  ResNet + attention stacks of taming-transformers (Esser et al., 2021), with the same module
  names, so a taming-format state dict loads into this model unchanged (see
  ``mars_tokenizer.taming``) and gives the same codes and reconstructions. We write the modules
  ourselves instead of importing taming: its package pulls torchvision and training code.
  Two departures, both off for imported checkpoints: the GroupNorm group count is a setting
  (taming fixes 32, too many for small channel counts) and attention uses
  ``scaled_dot_product_attention`` (same maths).
- **Downsampling factor = patch_size * 2 ** (len(ch_mult) - 1).** ``patch_size`` > 1 folds
  p x p pixel patches into channels before the encoder and unfolds them after the decoder
  (pixel_unshuffle / pixel_shuffle): the networks then run at 1/p of the resolution, with many
  channels where a CPU computes efficiently. The networks are fully convolutional (plus
  attention over positions), so any height and width that are multiples of the factor work:
  a 256x384 image gives 16x24 codes at factor 16.
- **Per-pixel layers around the folding** (``pixel_channels``, 0 for taming). Without them the
  decoder's last layer writes each p x p patch as a linear function of its features; a flat
  object over white is a mask times a colour, a product that one linear layer draws sharply
  only with a feature per pixel and colour. With them a 1x1 conv and SiLU run at full
  resolution before the encoder's folding, SiLU and a 1x1 conv after the decoder's unfolding:
  with 8 channels the shapes tokenizer reconstructs held-out two-object scenes at 0.97 instead
  of 0.86 after 4,000 steps (its failures were blunted triangle apexes and rounded square
  corners), for about 12% more time per step.
- **Two quantizers.** ``vq``: a learned codebook with nearest-neighbour search, taming's
  quantizer (``l2_normalize=False``) or, for training from scratch, l2-normalised
  low-dimensional codes (``l2_normalize=True``, small ``codebook_dim``; ViT-VQGAN, LlamaGen),
  a cosine match on a small sphere where codes stay near the encoder outputs; codes that stay
  unused are restarted on the encoder outputs the codebook fits worst
  (``VectorQuantizer.restart_dead_codes``, driven by the training module); straight-through gradients, codebook loss ||sg[z] - e||^2 and
  commitment loss beta * ||z - sg[e]||^2. ``fsq``: finite scalar quantization (Mentzer et al.),
  an implicit, fixed grid of prod(levels) codes: nothing to learn, so no code can die and there
  is no codebook or commitment loss.
- **The shapes and paper presets use the l2-normalised learned codebook with restarts.** On
  the shapes world both kinds collapse early in training (within 25 steps at lr 2e-3: FSQ to a
  single code, the learned codebook to 2 of 512); a restart brings the learned codebook back
  to hundreds of live codes at once, while FSQ stayed on one code for the 200 steps we
  watched (nothing restarts an implicit codebook).
- **No GroupNorm in the shapes decoder** (``decoder_norm=False``). GroupNorm standardises each
  channel group over all positions; on a white canvas with one or two flat objects, the
  object's features after the decoder's last norm keep only their direction within each group,
  scaled by the object's area, so the colour is hard to read back: with it, every tokenizer
  we trained for a few hundred steps drew the shapes right in one averaged brown. The encoder
  keeps its GroupNorm, which keeps the codes apart.
  Restarts also keep the codebook / commitment losses meaningful, and taming checkpoints
  import as plain ``vq``. FSQ stays available (``quantizer="fsq"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    """Architecture of a VQ-GAN. ``VQGANConfig.from_preset("shapes")`` gives a named preset."""

    # training image side; decides where attention blocks sit (attn_resolutions), nothing else:
    # any height/width that is a multiple of `downsample` can be encoded
    resolution: int = 256
    in_channels: int = 3
    # pixels per side folded into channels before the encoder (pixel_unshuffle) and unfolded
    # after the decoder (pixel_shuffle); taming: 1. Cheap small-image presets use 4
    patch_size: int = 1
    # with patch_size > 1: channels of a per-pixel layer on either side of the folding (the
    # module docstring says why); 0: none (taming)
    pixel_channels: int = 0
    # base channel count and its multiplier per resolution level; len(ch_mult) - 1 halvings
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    # residual blocks per level (the decoder uses one more, as in taming)
    num_res_blocks: int = 2
    # feature-map sides (at `resolution`) that get a self-attention block after each res block
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    # channels of the encoder output / decoder input
    z_channels: int = 256
    # number of codes and their dimension (quant_conv projects z_channels -> codebook_dim)
    codebook_size: int = 8192
    codebook_dim: int = 8
    # "vq": learned codebook (nearest neighbour); "fsq": finite scalar quantization, an implicit
    # codebook of prod(fsq_levels) codes in len(fsq_levels) dimensions (codebook_size and
    # codebook_dim must match them)
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = ()
    # vq: cosine (l2-normalised) nearest-neighbour codes; False reproduces taming's plain VQ
    l2_normalize: bool = True
    # GroupNorm groups (taming: 32); must divide every channel count
    norm_groups: int = 32
    # GroupNorm in the decoder too (taming: yes). The decoder's last GroupNorm (no skip around
    # it) normalises each channel group over the image, which on flat objects on a white
    # background cancels the size of the colour difference: see the module docstring
    decoder_norm: bool = True
    # weight of the commitment loss
    beta: float = 0.25

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.fsq_levels = tuple(int(n) for n in self.fsq_levels)
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if self.quantizer == "fsq" and (
            self.codebook_size != math.prod(self.fsq_levels) or self.codebook_dim != len(self.fsq_levels)
        ):
            raise ValueError(
                f"fsq_levels={self.fsq_levels} give {math.prod(self.fsq_levels)} codes of dimension "
                f"{len(self.fsq_levels)}; set codebook_size and codebook_dim to match"
            )
        for channels in {self.ch * m for m in self.ch_mult}:
            if channels % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} does not divide {channels} channels")
        if self.pixel_channels and self.patch_size == 1:
            raise ValueError("pixel_channels needs patch_size > 1 (without folding the networks already run per pixel)")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution={self.resolution} is not a multiple of downsample={self.downsample}")

    @property
    def downsample(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQGANConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, VQGANConfig] = {
    # MARS: downsample 16 (256x256 -> 16x16 codes), 8192 codes; taming's f16 networks
    "paper": VQGANConfig(),
    # shapes world at 64x64: downsample 16 as in the paper (4x4 = 16 codes per image), as
    # 4x4 pixel patches folded into channels and two halvings: the network runs at 16x16 and
    # below, where 16-64 channels are cheap on a CPU (0.7M parameters: at a fixed time budget,
    # more optimizer steps beat wider layers); 512 l2-normalised 8-d codes; 8 channels per
    # pixel around the folding
    "shapes": VQGANConfig(
        resolution=64, patch_size=4, pixel_channels=8, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
        attn_resolutions=(), z_channels=32, codebook_size=512, codebook_dim=8, norm_groups=8, decoder_norm=False,
    ),
    # unit tests: downsample 4, a few thousand parameters
    "tiny": VQGANConfig(
        resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
        z_channels=8, codebook_size=32, codebook_dim=4, norm_groups=4,
    ),
}


def _norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm, or nothing when groups == 0."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (proj(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample_name = name  # "downsample" / "upsample", as taming names them
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g = cfg.norm_groups
        self.patch_size = cfg.patch_size
        if cfg.pixel_channels:
            self.pixel_in = nn.Conv2d(cfg.in_channels, cfg.pixel_channels, 1)
        self.conv_in = nn.Conv2d((cfg.pixel_channels or cfg.in_channels) * cfg.patch_size**2, cfg.ch, 3, padding=1)
        res, block_in, levels = cfg.resolution // cfg.patch_size, cfg.ch, []
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            last = i == len(cfg.ch_mult) - 1
            levels.append(Level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = Mid(block_in, cfg.dropout, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pixel_in"):
            x = F.silu(self.pixel_in(x))
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size))
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g = cfg.norm_groups if cfg.decoder_norm else 0
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in, cfg.dropout, g)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            levels.insert(0, Level(blocks, attns, Upsample(block_in) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)  # indexed by level like the encoder; run in reverse
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, (cfg.pixel_channels or cfg.in_channels) * cfg.patch_size**2, 3, padding=1)
        if cfg.pixel_channels:
            self.pixel_out = nn.Conv2d(cfg.pixel_channels, cfg.in_channels, 1)
        self.patch_size = cfg.patch_size

    @property
    def last_layer(self) -> nn.Conv2d:
        """The layer that writes the pixels (the GAN's adaptive weight compares gradients there)."""
        return getattr(self, "pixel_out", self.conv_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        x = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch_size)
        return self.pixel_out(F.silu(x)) if hasattr(self, "pixel_out") else x


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with straight-through gradients and dead-code restarts."""

    def __init__(self, size: int, dim: int, l2_normalize: bool, beta: float):
        super().__init__()
        self.size, self.dim, self.l2_normalize, self.beta = size, dim, l2_normalize, beta
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)
        # running count of how often each code was picked in training (not saved: a statistic)
        self.register_buffer("usage", torch.zeros(size), persistent=False)

    def codebook(self) -> torch.Tensor:
        e = self.embedding.weight
        return F.normalize(e, dim=-1) if self.l2_normalize else e

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B*h*w, D), normalised when the codebook is."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        e = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(dim=1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h, w) indices of their nearest codes."""
        b, _, h, w = z.shape
        return self.nearest(self._prepare(z)).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, D, h, w) code vectors."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (z_q with straight-through gradient, codes (B, h, w), codebook loss, commitment loss)."""
        b, _, h, w = z.shape
        flat = self._prepare(z)
        codes = self.nearest(flat.detach())
        q = self.codebook()[codes]
        codebook_loss = F.mse_loss(q, flat.detach())
        commitment_loss = self.beta * F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        z_q = q.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        if self.training:
            with torch.no_grad():
                self.usage.mul_(0.99).add_(torch.bincount(codes, minlength=self.size).float())
        return z_q, codes.reshape(b, h, w), codebook_loss, commitment_loss

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float = 1e-3) -> int:
        """Move codes whose running usage fell below `threshold` onto encoder outputs of `z`.

        `z` is a batch of (pre-quantization) encoder outputs (B, D, h, w). The new places are
        drawn with probability proportional to each output's squared distance from its nearest
        code, so dead codes go where the codebook fits worst (a code shared by two kinds of
        input, e.g. the same shape in two colours, is split) rather than onto the many outputs
        that are already well coded (e.g. background). Returns how many codes
        were restarted. Restarted codes get a usage of twice the threshold: if they are not
        picked they are restarted again after about 70 steps (the usage decays by 0.99 a step).
        """
        dead = (self.usage < threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        flat = self._prepare(z)
        error = (flat - self.codebook()[self.nearest(flat)]).pow(2).sum(1)
        picks = torch.multinomial(error + 1e-12, dead.numel(), replacement=True)
        noise = 0.01 * flat.std() * torch.randn(dead.numel(), self.dim, device=flat.device)
        self.embedding.weight[dead] = (flat[picks] + noise).to(self.embedding.weight.dtype)
        self.usage[dead] = 2 * threshold
        return int(dead.numel())


class FiniteScalarQuantizer(nn.Module):
    """FSQ (Mentzer et al., 2023): each latent dimension i is squashed to [0, L_i - 1] and rounded
    (straight-through); the code is the mixed-radix number of the digits. The codebook is
    implicit and fixed, so no code can die and there is no codebook or commitment loss."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.size, self.dim = math.prod(levels), len(levels)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        radix = torch.cumprod(torch.tensor((1, *levels[:-1])), 0)
        self.register_buffer("radix", radix, persistent=False)
        self.register_buffer("usage", torch.zeros(self.size), persistent=False)

    def _digits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w, D) values in [0, L - 1], rounded with a straight-through gradient."""
        scaled = (torch.tanh(z.permute(0, 2, 3, 1)) + 1) / 2 * (self.levels - 1)
        return scaled + (scaled.round() - scaled).detach()

    def _vectors(self, digits: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) digits -> (B, D, h, w) code vectors in [-1, 1]."""
        return (digits / (self.levels - 1) * 2 - 1).permute(0, 3, 1, 2).contiguous()

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return (self._digits(z).round().long() * self.radix).sum(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes[..., None] // self.radix) % self.levels
        return self._vectors(digits.float())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        digits = self._digits(z)
        codes = (digits.detach().round().long() * self.radix).sum(-1)
        if self.training:
            with torch.no_grad():
                self.usage.mul_(0.99).add_(torch.bincount(codes.flatten(), minlength=self.size).float())
        zero = z.new_zeros(())
        return self._vectors(digits), codes, zero, zero


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (taming's VQModel)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        if config.quantizer == "fsq":
            self.quantize = FiniteScalarQuantizer(config.fsq_levels)
        else:
            self.quantize = VectorQuantizer(config.codebook_size, config.codebook_dim, config.l2_normalize, config.beta)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> continuous codebook-space latents (B, codebook_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> codes (B, H/f, W/f)."""
        return self.quantize.codes(self.encode_latent(x))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*f, w*f), not clamped."""
        return self.decode_latent(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode_latent(x)
        z_q, codes, codebook_loss, commitment_loss = self.quantize(z)
        return {
            "reconstruction": self.decode_latent(z_q),
            "codes": codes,
            "latent": z,
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
        }

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram (counts per code): the effective number of codes in use."""
    p = counts.float() / counts.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())

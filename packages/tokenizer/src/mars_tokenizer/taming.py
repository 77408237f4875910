"""Import VQ-GAN checkpoints in taming-transformers' format.

A taming ``VQModel`` checkpoint is a Lightning file whose ``state_dict`` holds ``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight`` and the
training-only ``loss.*`` (discriminator, LPIPS). Its architecture lives in the YAML next to it,
under ``model.params``: ``ddconfig``, ``n_embed``, ``embed_dim``. Our ``VQGAN`` uses the same
module names, so the import is: derive a ``VQGANConfig`` (plain nearest-neighbour VQ, GroupNorm
with 32 groups, as taming) and load the autoencoder keys unchanged.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from mars_tokenizer.tokenizer import VQTokenizer
from mars_tokenizer.vqgan import VQGANConfig

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def config_from_taming(params: Mapping) -> VQGANConfig:
    """``model.params`` of a taming VQModel config (ddconfig, n_embed, embed_dim) -> VQGANConfig."""
    dd = params["ddconfig"]
    if dd.get("double_z", False):
        raise ValueError("ddconfig.double_z=True is a KL autoencoder, not a VQ-GAN")
    if dd.get("out_ch", dd["in_channels"]) != dd["in_channels"]:
        raise ValueError(f"out_ch={dd['out_ch']} differs from in_channels={dd['in_channels']}: not supported")
    if params.get("remap") is not None:
        raise ValueError("codebook remapping (quantize.remap) is not supported")
    return VQGANConfig(
        resolution=dd["resolution"],
        in_channels=dd["in_channels"],
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]),
        dropout=dd.get("dropout", 0.0),
        z_channels=dd["z_channels"],
        codebook_size=params["n_embed"],
        codebook_dim=params["embed_dim"],
        l2_normalize=False,
        norm_groups=32,
    )


def tokenizer_from_taming_state_dict(state_dict: Mapping[str, torch.Tensor], params: Mapping) -> VQTokenizer:
    """A VQTokenizer holding a taming VQModel's weights (``loss.*`` and other training keys dropped)."""
    tokenizer = VQTokenizer(config_from_taming(params))
    weights = {k: v for k, v in state_dict.items() if k.startswith(AUTOENCODER_PREFIXES)}
    missing, unexpected = tokenizer.vqgan.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the taming config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return tokenizer.eval()


def tokenizer_from_taming(checkpoint: str | Path, config: str | Path | Mapping, trusted: bool = False) -> VQTokenizer:
    """Load a taming VQ-GAN: ``checkpoint`` (.ckpt, or a bare state dict file) and its YAML config
    (path, or the already-parsed mapping with ``model.params`` or just the params).

    Original taming checkpoints also pickle Lightning-1 training state, which torch only
    unpickles with ``weights_only=False``: pass ``trusted=True`` for files you trust.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"taming checkpoint {checkpoint} does not exist")
    if not isinstance(config, Mapping):
        config_path = Path(config)
        if not config_path.is_file():
            raise FileNotFoundError(f"taming config {config_path} does not exist")
        config = yaml.safe_load(config_path.read_text())
    params = config["model"]["params"] if "model" in config else config
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{checkpoint} holds more than tensors (e.g. Lightning-1 training state); if you trust "
            f"the file, load it with trusted=True"
        ) from err
    return tokenizer_from_taming_state_dict(state.get("state_dict", state), params)

"""mars_tokenizer: the VQ-GAN image tokenizer of MARS (see the package README)."""

from importlib.metadata import version as _version

from mars_tokenizer.taming import tokenizer_from_taming, tokenizer_from_taming_state_dict
from mars_tokenizer.tokenizer import VQTokenizer
from mars_tokenizer.vqgan import PRESETS, VQGAN, VQGANConfig

__version__ = _version("mars-tokenizer")


def __getattr__(name: str):
    # the Lightning module is imported on first use: encoding and decoding need no Lightning
    if name == "VQGANModule":
        from mars_tokenizer.module import VQGANModule

        return VQGANModule
    raise AttributeError(f"module 'mars_tokenizer' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "VQGAN",
    "VQGANConfig",
    "VQGANModule",
    "VQTokenizer",
    "tokenizer_from_taming",
    "tokenizer_from_taming_state_dict",
]

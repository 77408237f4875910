"""mars_superres: MARS's cascaded super-resolution model (stage III), see the package README.

- ``SuperResModel`` / ``SuperResConfig``: a SemVIE reading a caption and low-res codes and
  writing high-res codes, with K next-token heads (``model.py``)
- ``decode``: fast (K tokens per pass) and exact self-speculative decoding (``decoding.py``)
- ``SuperResModule``: its Lightning training module (``module.py``)
"""

from importlib.metadata import version as _version

from mars_superres.decoding import DecodeStats, decode
from mars_superres.model import SuperResConfig, SuperResModel, hires_size, lowres_input

__version__ = _version("mars-superres")


def __getattr__(name: str):
    # the Lightning module is imported on first use: the model and decoding need no Lightning
    if name == "SuperResModule":
        from mars_superres.module import SuperResModule

        return SuperResModule
    raise AttributeError(name)


__all__ = ["DecodeStats", "SuperResConfig", "SuperResModel", "SuperResModule", "decode", "hires_size", "lowres_input"]

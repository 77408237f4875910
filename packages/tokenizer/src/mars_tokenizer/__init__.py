"""mars_tokenizer: see the package README."""

from importlib.metadata import version as _version

__version__ = _version("mars-tokenizer")

"""mars_data: see the package README."""

from importlib.metadata import version as _version

__version__ = _version("mars-data")

"""The MARS application: glue that combines the packages for training and generation."""

from importlib.metadata import version as _version

__version__ = _version("mars-app")

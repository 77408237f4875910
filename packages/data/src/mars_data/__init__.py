"""mars_data: the shapes world, webdataset shards and datamodules (see the package README).

The datamodules are imported on first use (``mars_data.ShardDataModule``), so the shapes world
(``mars_data.shapes``) loads without torch and Lightning, e.g. in shard-writing processes.
"""

from importlib import import_module
from importlib.metadata import version as _version

__version__ = _version("mars-data")

_LAZY = {"ShardDataModule": "mars_data.datamodules", "ShapesDataModule": "mars_data.datamodules"}
__all__ = ["ShardDataModule", "ShapesDataModule", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mars_data' has no attribute {name!r}")

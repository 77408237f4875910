"""Training pieces shared by every MARS stage: the learning-rate schedule, the optimizer's parameter groups, atomic writing,
the check of a path the user gives."""

from mars_core.io import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic
from mars_core.paths import require_path
from mars_core.schedule import build_optimizer, run_length, warmup_cosine, warmup_cosine_scheduler

__version__ = "0.1.0"
__all__ = [
    "atomic_path",
    "build_optimizer",
    "require_path",
    "run_length",
    "warmup_cosine",
    "warmup_cosine_scheduler",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

"""The one learning-rate schedule of every MARS training module, the run length under it, and
the optimizer's parameter groups it drives (``build_optimizer``).

``warmup_cosine``: a linear warm-up to the peak over the first ``warmup`` steps, then a cosine
decay to ``min_lr_ratio`` of the peak at the run's last step (``min_lr_ratio=1``: constant
after the warm-up). It is laid over the run's length:

- ``trainer.max_steps`` when set;
- otherwise the training loader's length times ``max_epochs`` (over devices and gradient
  accumulation, as Lightning estimates it); the mars_data datamodules give their stream a
  length from ``samples_per_epoch``;
- neither known (a webdataset stream has no length): the run refuses to start. Guessing would
  put all but the first step at the floor or at the peak, silently.

With ``trainer.max_time`` the schedule follows whichever budget (steps, time) runs out first,
so a run cut by its time limit still ends decayed rather than at its peak.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


def run_length(trainer) -> int:
    """Optimizer steps the run will take, or a ValueError saying what to set."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimated = trainer.estimated_stepping_batches
    if math.isinf(estimated) or estimated < 1:
        raise ValueError(
            "the learning-rate schedule needs the run's length, and the training data has none "
            "(a webdataset stream): set trainer.max_steps, or data.samples_per_epoch with trainer.max_epochs"
        )
    return int(estimated)


def warmup_cosine(step: int, total: int, warmup: int, min_lr_ratio: float, done: float | None = None) -> float:
    """The factor of the peak learning rate at ``step`` (0-based) of ``total``.

    ``done`` overrides the share of the run already done (a time budget); the warm-up still
    ends after ``warmup`` steps or that share of the run, whichever comes first."""
    share = step / max(1, total) if done is None else done
    warmup_share = warmup / max(1, total)
    if step < warmup and share < warmup_share:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, (share - warmup_share) / max(1e-8, 1.0 - warmup_share)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    new_parts: tuple[str, ...] = (),
    new_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer (``optimizer``: a partial taking parameter groups) over the trainable ones of
    ``named_parameters``: weight decay on matrices only (not on biases, norms, embeddings, learned
    positions); the parameters whose names start with ``new_parts`` in a group of their own,
    without decay, at ``new_lr_scale`` times the learning rate: they start from nothing while
    the rest starts trained, so at one learning rate they would lag behind (docs/LOG.md)."""
    decay, no_decay, new = [], [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        if name.startswith(new_parts):
            new.append(p)
        elif p.dim() < 2 or any(part in name for part in ("embed", "norm", "image_position")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}, {"params": new, "weight_decay": 0.0, "lr_scale": new_lr_scale}]
    built = optimizer([g for g in groups if g["params"]])
    for group in built.param_groups:
        group["lr"] *= group.pop("lr_scale", 1.0)
    return built


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    trainer,
    *,
    warmup_ratio: float | None = None,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
) -> dict:
    """Lightning's ``lr_scheduler`` entry (stepped every optimizer step) for ``optimizer``.

    Give the warm-up as a share of the run (``warmup_ratio``, the paper's 0.01) or in steps."""
    if (warmup_ratio is None) == (warmup_steps is None):
        raise ValueError("give exactly one of warmup_ratio and warmup_steps")
    total = run_length(trainer)
    warmup = max(1, warmup_steps if warmup_steps is not None else int(warmup_ratio * total))
    timer = _time_budget(trainer)

    def factor(step: int) -> float:
        done = None
        if timer is not None:
            done = max(step / total, timer.time_elapsed("train") / timer._duration)
        return warmup_cosine(step, total, warmup, min_lr_ratio, done)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def _time_budget(trainer):
    """Lightning's Timer callback when the run has ``max_time``, else None."""
    from lightning.pytorch.callbacks import Timer

    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer) and c._duration), None)

"""Train any MARS stage: ``python apps/train.py experiment=<name> [overrides]``.

Experiments live in conf/experiment/. A sweep is ``python apps/train.py -m experiment=X
key=a,b``; each job leaves ``metrics.json`` in its run directory and the sweep a summary table.
Resume with ``ckpt_path=<run dir>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from mars_app.cli import check_options, run_app
from mars_core.io import write_json_atomic


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a ``name: {_target_: ...}`` mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry and "_target_" in entry]


@dataclass
class TrainOptions:
    """The typed top-level options of conf/train.yaml, checked before anything is built."""

    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None
    metrics_file: str | None = None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data; returns the final logged metrics."""
    check_options(cfg, TrainOptions, "conf/train.yaml")
    if cfg.get("model") is None or cfg.get("data") is None:
        raise ValueError(
            "No model or data chosen: pick an experiment, e.g. `python apps/train.py "
            "experiment=shapes_tokenizer` (see conf/experiment/)."
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist: nothing to resume from.")

    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")), logger=loggers or False
    )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)

    # weights_only: a checkpoint holding pickled objects (code) is refused, never run
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = float(trainer.global_step)
    if trainer.is_global_zero and cfg.get("metrics_file"):
        write_json_atomic(cfg.metrics_file, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_app(train, cfg)


if __name__ == "__main__":
    main()

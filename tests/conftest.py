"""Shared fixtures of the application tests: compose a train config like the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """The config `python apps/<config_name>.py <overrides>` would run with, writing under run_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.root_dir = str(run_dir)
            cfg.paths.output_dir = str(run_dir / "run")
        cfg.hydra.runtime.output_dir = str(run_dir / "run")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # the CLI hands the job its config without the hydra node
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """Factory: make_cfg(["experiment=...", ...]) -> composed config writing into tmp_path."""

    def factory(overrides: list[str], config_name: str = "train") -> DictConfig:
        return compose_config(overrides, tmp_path, config_name)

    return factory


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, while on a machine shared with other jobs
    every parallel op waits for descheduled workers: measured 10x slower with the default threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

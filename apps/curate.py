"""Curate shards: ``python apps/curate.py input=SHARDS output=DIR [curate=paper|tiny] [ray.address=...]``.

A thin Hydra entry point around ``mars_data.curation.curate`` (conf/curate.yaml, recipes in
conf/curate/): the composed ``curate`` group becomes a ``Recipe`` (unknown keys and missing
model paths are errors naming the option), the run prints its progress and, at the end, the
report it also writes as JSON.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from mars_app.cli import run_app
from mars_data.curation import Recipe, curate


def run(cfg: DictConfig) -> dict:
    recipe = Recipe.from_dict(OmegaConf.to_container(cfg.curate, resolve=True))
    shards = OmegaConf.to_container(cfg.input) if OmegaConf.is_list(cfg.input) else cfg.input
    report = curate(shards, cfg.output, recipe, address=cfg.ray.address, num_cpus=cfg.ray.num_cpus,
                    max_shards=cfg.max_shards, report=cfg.report)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    run_app(run, cfg)


if __name__ == "__main__":
    main()

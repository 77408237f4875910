"""The web demo: draw and caption with a MARS checkpoint in the browser (Gradio).

    python apps/serve.py ckpt=DIR [port=7860] [host=0.0.0.0]
    make serve                      # on the checkpoint `make demo` trained

Loads the checkpoint once (``MarsPipeline.from_pretrained``) and serves the page of
``mars_app.serve.build_app`` until stopped (Ctrl-C). Options: conf/serve.yaml. With
``superres=DIR`` (a stage III checkpoint, ``<run>/superres``) every drawn image is upscaled
too, as by ``apps/generate.py superres=DIR``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import hydra
from omegaconf import DictConfig

from mars_app.cascade import SuperResPipeline
from mars_app.cli import run_app
from mars_app.pipeline import MarsPipeline
from mars_app.serve import build_app, describe, launch


def serve(cfg: DictConfig, block: bool = True) -> gr.Blocks:
    """Load the checkpoint and serve the demo; ``block=False`` returns the running app (tests)."""
    if not 0 < int(cfg.port) < 65536:
        raise ValueError(f"port={cfg.port} is not a TCP port (1-65535)")
    pipeline = MarsPipeline.from_pretrained(cfg.ckpt, llm_path=cfg.llm_path, device=cfg.device)
    superres = None if cfg.superres is None else SuperResPipeline.from_pretrained(cfg.superres, llm_path=cfg.llm_path, device=cfg.device)
    description = describe(pipeline, Path(cfg.ckpt).name, superres)
    app = build_app(pipeline, list(cfg.examples), cfg.max_images, cfg.title, description, superres)
    print(f"MARS demo on http://{cfg.host}:{cfg.port} (checkpoint {cfg.ckpt}); Ctrl-C stops it", flush=True)
    return launch(app, cfg.host, int(cfg.port), block, cfg.max_file_size)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    # Gradio pings its own server at start; Hydra's logging would print each request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_app(serve, cfg)


if __name__ == "__main__":
    main()

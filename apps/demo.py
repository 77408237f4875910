"""The embedded default end to end: ``make demo`` (``python apps/demo.py [out_dir=DIR]``).

Runs the project's own commands in order, printing each before it runs, so that every step
can be repeated by hand: held-out prompts, the VQ tokenizer, the text LLM, pre-tokenized
shards, MARS stage I, a sample grid, generation and evaluation on the held-out prompts, and
captions of the generated images. A finished step leaves ``<out_dir>/.done/<step>`` and is
skipped on the next run; an interrupted training step resumes from its last checkpoint. Data
lives in ``<out_dir>/data``, each training run in ``<out_dir>/<step>``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

APPS = Path(__file__).resolve().parent


@dataclass
class Step:
    name: str
    args: Callable[[], list[str]]  # after `python`; built when the step runs (it may read earlier outputs)
    resume_from: Path | None = None  # a training step's last checkpoint


def train_step(name: str, overrides: list[str], out: Path) -> Step:
    run = out / name
    args = [str(APPS / "train.py"), *overrides, f"hydra.run.dir={run}", f"paths.data_dir={out / 'data'}"]
    return Step(name, lambda: args, resume_from=run / "checkpoints" / "last.ckpt")


def demo_steps(cfg: DictConfig, out: Path) -> list[Step]:
    data = out / "data"
    eval_prompts = data / "eval" / f"prompts-{cfg.eval_seed}.jsonl"
    tokenizer, llm, ckpt = out / "tokenizer" / "tokenizer", out / "lm" / "llm", out / "stage1" / "mars"

    def shapes_train_shards() -> str:  # written by the tokenizer run's ShapesDataModule
        found = sorted((data / "shapes").glob("train-*"))
        if not found:
            raise FileNotFoundError(f"no shapes training shards under {data / 'shapes'}")
        return str(found[0])

    return [
        Step("eval_prompts", lambda: ["-m", "mars_data.shapes", "prompts", "--num", str(cfg.eval_num),
                                      "--seed", str(cfg.eval_seed), "--out", str(eval_prompts)]),
        train_step("tokenizer", list(cfg.tokenizer), out),
        train_step("lm", list(cfg.lm), out),
        Step("codes", lambda: [str(APPS / "tokenize_shards.py"), f"tokenizer={tokenizer}",
                               f"input={shapes_train_shards()}", f"output={data / 'shapes_codes' / 'train'}",
                               f"hydra.run.dir={out / 'codes'}"]),
        train_step("stage1", [*cfg.stage1, f"model.llm_path={llm}", f"model.tokenizer_path={tokenizer}"], out),
        Step("samples", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", f"prompts={write_sample_prompts(cfg, out)}",
                                 f"out={out / 'samples'}", "grid=true", f"hydra.run.dir={out / 'samples'}"]),
        Step("generate_eval", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", f"prompts={eval_prompts}",
                                       f"out={out / 'eval_images'}", f"hydra.run.dir={out / 'eval_images'}"]),
        Step("evaluate", lambda: [str(APPS / "evaluate.py"), "task=shapes", f"prompts={eval_prompts}",
                                  f"images={out / 'eval_images'}", f"hydra.run.dir={out / 'eval_images'}"]),
        Step("captions", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", "task=caption",
                                  f"images={out / 'eval_images'}", f"out={out / 'captions.jsonl'}",
                                  f"hydra.run.dir={out / 'eval_images'}"]),
    ]


def write_sample_prompts(cfg: DictConfig, out: Path) -> Path:
    path = out / "sample_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in cfg.sample_prompts))
    return path


def run_steps(steps: list[Step], out: Path) -> None:
    done_dir = out / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(steps, 1):
        header, marker = f"[{i}/{len(steps)}] {step.name}", done_dir / step.name
        if marker.exists():
            print(f"{header}: done already", flush=True)
            continue
        command = [sys.executable, *step.args()]
        if step.resume_from is not None and step.resume_from.exists():
            command.append(f"ckpt_path={step.resume_from}")
        print(f"{header}: {shlex.join(command)}", flush=True)
        start = time.monotonic()
        subprocess.run(command, check=True)
        marker.touch()
        print(f"{header}: finished in {time.monotonic() - start:.0f} s", flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir).resolve()
    start = time.monotonic()
    run_steps(demo_steps(cfg, out), out)
    print(f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min. Artifacts in {out}:")
    print(f"  MARS checkpoint:  {out / 'stage1' / 'mars'}")
    print(f"  sample grid:      {out / 'samples' / 'grid.png'}")
    print(f"  evaluation:       {out / 'eval_images' / 'eval_summary.json'}")
    print(f"  captions:         {out / 'captions.jsonl'}")
    print(f"Draw with it:\n  python apps/generate.py ckpt={out / 'stage1' / 'mars'} prompt=\"a red circle above a blue square\"")


if __name__ == "__main__":
    main()

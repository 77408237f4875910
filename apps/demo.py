"""The embedded default end to end: ``make demo`` (``python apps/demo.py [out_dir=DIR]``).

Runs the project's own commands in order, printing each before it runs, so that every step
can be repeated by hand. A step whose result exists is skipped; a training step that was
interrupted resumes from its last checkpoint. Data lives in ``<out_dir>/data``, each step's
run in ``<out_dir>/<step>``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

APPS = Path(__file__).resolve().parent


@dataclass
class Step:
    name: str
    args: list[str]  # after `python`
    done: Path  # exists once the step has finished
    resume_from: Path | None = None  # a training step's last checkpoint

    def command(self) -> list[str]:
        args = list(self.args)
        if self.resume_from is not None and self.resume_from.exists():
            args.append(f"ckpt_path={self.resume_from}")
        return [sys.executable, *args]


def train_step(name: str, overrides: list[str], out: Path) -> Step:
    run = out / name
    return Step(
        name,
        [str(APPS / "train.py"), *overrides, f"hydra.run.dir={run}", f"paths.data_dir={out / 'data'}"],
        done=run / "metrics.json",
        resume_from=run / "checkpoints" / "last.ckpt",
    )


def demo_steps(cfg: DictConfig) -> list[Step]:
    out = Path(cfg.out_dir).resolve()
    prompts = out / "eval_prompts.jsonl"
    return [
        Step(
            "eval_prompts",
            ["-m", "mars_data.shapes", "prompts", "--num", str(cfg.eval_prompts.num),
             "--seed", str(cfg.eval_prompts.seed), "--out", str(prompts)],
            done=prompts,
        ),
        train_step("tokenizer", list(cfg.tokenizer), out),
        train_step("lm", list(cfg.lm), out),
    ]


def run_steps(steps: list[Step]) -> None:
    for i, step in enumerate(steps, 1):
        header = f"[{i}/{len(steps)}] {step.name}"
        if step.done.exists():
            print(f"{header}: done already ({step.done})", flush=True)
            continue
        command = step.command()
        print(f"{header}: {shlex.join(command)}", flush=True)
        start = time.monotonic()
        subprocess.run(command, check=True)
        if not step.done.exists():
            raise RuntimeError(f"step {step.name} finished without writing {step.done}")
        print(f"{header}: finished in {time.monotonic() - start:.0f} s", flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    start = time.monotonic()
    run_steps(demo_steps(cfg))
    out = Path(cfg.out_dir).resolve()
    print(f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min. Artifacts in {out}:")
    print(f"  tokenizer:      {out / 'tokenizer' / 'tokenizer'}")
    print(f"  text LLM:       {out / 'lm' / 'llm'}")
    print(f"  eval prompts:   {out / 'eval_prompts.jsonl'}")


if __name__ == "__main__":
    main()

"""The embedded default end to end: ``make demo`` (``python apps/demo.py [out_dir=DIR]``).

Runs the project's own commands in order, printing each before it runs, so that every step
can be repeated by hand: the VQ tokenizer and the text LLM (side by side: they do not depend on
each other, and two one-thread jobs use 2 cores better than one two-thread job; the codes of
stage I's scenes follow the tokenizer in its lane, the held-out prompts and their scenes and
the renders for stage I and stage III follow the LLM in its), the super-resolution triplets
beside MARS stage I, stage III beside the captions of the held-out scenes, generation on the
held-out prompts at 64 px and through the cascade at 128 px beside a sample grid, their
evaluation, and the captions scored. Every step not on the longest path runs beside one that
is: the demo's time budget (docs/LOG.md). With ``with_stage2=true`` also stage II beside stage
III (renders at every aspect ratio, their codes, training from stage I, the held-out prompts
drawn and scored at every size). A finished step leaves
``<out_dir>/.done/<step>`` and is skipped on the next run; an interrupted training step
resumes from its last checkpoint. Data lives in ``<out_dir>/data``, each training run in
``<out_dir>/<step>``; steps run side by side write their output to ``<out_dir>/<step>.log``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from mars_app.cli import run_app

APPS = Path(__file__).resolve().parent


@dataclass
class Step:
    name: str
    args: Callable[[], list[str]]  # after `python`; built when the step runs (it may read earlier outputs)
    resume_from: Path | None = None  # a training step's last checkpoint


def train_step(name: str, overrides: list[str], out: Path, seed: int) -> Step:
    run = out / name
    args = [str(APPS / "train.py"), *overrides, f"seed={seed}", f"hydra.run.dir={run}", f"paths.data_dir={out / 'data'}"]
    return Step(name, lambda: args, resume_from=run / "checkpoints" / "last.ckpt")


def demo_steps(cfg: DictConfig, out: Path) -> list[Step | tuple[Step, ...]]:
    data = out / "data"
    eval_prompts = data / "eval" / f"prompts-{cfg.eval_seed}.jsonl"
    tokenizer, llm, ckpt = out / "tokenizer" / "tokenizer", out / "lm" / "llm", out / "stage1" / "mars"
    superres, triplets = out / "stage3" / "superres", data / "superres_triplets" / "train"
    cascade = [f"superres={superres}", f"tokens_per_step={cfg.tokens_per_step}", f"decode={cfg.decode}"]

    stage2_steps = stage2_demo_steps(cfg, out, tokenizer, llm, ckpt / "semvie") if cfg.with_stage2 else []

    return [
        (  # the tokenizer, then the codes of stage I's scenes, beside the text LLM and the rest of the data
            [train_step("tokenizer", list(cfg.tokenizer), out, cfg.seed),
             Step("codes", lambda: [str(APPS / "tokenize_shards.py"), f"tokenizer={tokenizer}",
                                    f"input={data / 'shapes_stage1'}", f"output={data / 'shapes_codes' / 'train'}", "resolutions=[64x64]",
                                    f"hydra.run.dir={out / 'codes'}"])],
            [train_step("lm", list(cfg.lm), out, cfg.seed),
             Step("eval_prompts", lambda: ["-m", "mars_data.shapes", "prompts", "--num", str(cfg.eval_num),
                                           "--seed", str(cfg.eval_seed), "--out", str(eval_prompts)]),
             Step("eval_scenes", lambda: ["-m", "mars_data.shapes", "render", "--prompts", str(eval_prompts),
                                          "--out", str(out / "eval_scenes")]),
             Step("renders_128", lambda: ["-m", "mars_data.shapes", "shards", "--out", str(data / "shapes128"),
                                          "--num-samples", str(cfg.superres_samples), "--size", "128", "--lowres", "64",
                                          "--seed", str(cfg.seed)]),
             Step("renders_stage1", lambda: ["-m", "mars_data.shapes", "shards", "--out", str(data / "shapes_stage1"),
                                             "--num-samples", str(cfg.stage1_samples), "--size", "64,128", "--seed", str(cfg.seed)]),
             *stage2_steps[:1]],
        ),
        (  # stage III's triplets (and stage II's codes) beside stage I (which takes the second core when they are written)
            [Step("triplets", lambda: [str(APPS / "superres_shards.py"), f"tokenizer={tokenizer}", f"input={data / 'shapes128'}",
                                       f"output={triplets}", "lowres_member=lowres.png", f"hydra.run.dir={out / 'triplets'}"]),
             *stage2_steps[1:2]],
            train_step("stage1", [*cfg.stage1, f"model.llm_path={llm}", f"model.tokenizer_path={tokenizer}"], out, cfg.seed),
        ),
        (  # beside stage III the held-out scenes' captions, which need only stage I, and stage II when asked for
            train_step("stage3", [*cfg.stage3, f"model.base_path={ckpt}", f"data.train_shards={triplets}"], out, cfg.seed),
            Step("captions", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", "task=caption",
                                      f"images={out / 'eval_scenes'}", f"out={out / 'captions' / 'captions.jsonl'}", "overwrite=true",
                                      f"hydra.run.dir={out / 'captions'}"]),
            *([stage2_steps[2:]] if stage2_steps else []),
        ),
        (  # the held-out prompts drawn beside the sample grid
            Step("generate_eval", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", f"prompts={eval_prompts}", *cascade,
                                           "save_base=true", f"out={out / 'eval_images'}", "overwrite=true",
                                           f"hydra.run.dir={out / 'eval_images'}"]),
            Step("samples", lambda: [str(APPS / "generate.py"), f"ckpt={ckpt}", f"prompts={write_sample_prompts(cfg, out)}", *cascade,
                                     "save_base=true", f"out={out / 'samples'}", "grid=true", "overwrite=true",
                                     f"hydra.run.dir={out / 'samples'}"]),
        ),
        Step("evaluate", lambda: [str(APPS / "evaluate.py"), "task=shapes", f"prompts={eval_prompts}",
                                  f"images={out / 'eval_images' / 'base'}", f"hydra.run.dir={out / 'eval_images' / 'base'}"]),
        Step("evaluate_cascade", lambda: [str(APPS / "evaluate.py"), "task=shapes", f"prompts={eval_prompts}",
                                          f"images={out / 'eval_images'}", f"hydra.run.dir={out / 'eval_images'}"]),
        Step("evaluate_captions", lambda: [str(APPS / "evaluate.py"), "task=captions", f"prompts={eval_prompts}",
                                           f"captions={out / 'captions' / 'captions.jsonl'}",
                                           f"hydra.run.dir={out / 'captions'}"]),
    ]


def stage2_demo_steps(cfg: DictConfig, out: Path, tokenizer: Path, llm: Path, stage1: Path) -> list[Step]:
    """Stage II (``with_stage2=true``): renders at every aspect ratio, their
    codes, training from stage I, and the held-out prompts drawn and scored at every size."""
    from mars_data.shapes import aspect_size

    data, eval_prompts = out / "data", out / "data" / "eval" / f"prompts-{cfg.eval_seed}.jsonl"
    sizes = [f"{w}x{h}" for w, h in (aspect_size(64, ratio) for ratio in cfg.stage2_aspect_ratios)]
    codes, ckpt = data / "shapes_codes_ar" / "train", out / "stage2" / "mars"
    steps = [
        Step("renders_ar", lambda: ["-m", "mars_data.shapes", "shards", "--out", str(data / "shapes_ar"),
                                    "--num-samples", str(cfg.stage2_samples), "--aspect-ratios", ",".join(cfg.stage2_aspect_ratios),
                                    "--seed", str(cfg.seed)]),
        Step("codes_ar", lambda: [str(APPS / "tokenize_shards.py"), f"tokenizer={tokenizer}", f"input={data / 'shapes_ar'}",
                                  f"output={codes}", f"resolutions=[{','.join(sizes)}]", f"hydra.run.dir={out / 'codes_ar'}"]),
        train_step("stage2", [*cfg.stage2, f"model.llm_path={llm}", f"model.tokenizer_path={tokenizer}", f"model.init_from={stage1}",
                              f"data.train_shards={codes}", f"model.resolutions=[{','.join(sizes)}]"], out, cfg.seed),
    ]
    for size in sizes:
        images = out / "eval_stage2" / size
        steps += [
            Step(f"generate_stage2_{size}", lambda images=images, size=size: [
                str(APPS / "generate.py"), f"ckpt={ckpt}", f"prompts={eval_prompts}", f"resolution={size}", f"out={images}",
                "overwrite=true", f"hydra.run.dir={images}"]),
            Step(f"evaluate_stage2_{size}", lambda images=images: [
                str(APPS / "evaluate.py"), "task=shapes", f"prompts={eval_prompts}", f"images={images}", f"hydra.run.dir={images}"]),
        ]
    return steps


def write_sample_prompts(cfg: DictConfig, out: Path) -> Path:
    path = out / "sample_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in cfg.sample_prompts))
    return path


def run_steps(steps: list[Step | tuple[Step | list[Step], ...]], out: Path) -> None:
    """Run each step unless its ``.done`` marker exists. A tuple runs side by side, each of its
    entries a step or a list of steps run one after the other (a lane)."""
    done_dir = out / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(steps, 1):
        lanes = [entry if isinstance(entry, list) else [entry] for entry in (group if isinstance(group, tuple) else (group,))]
        for step in (s for lane in lanes for s in lane if (done_dir / s.name).exists()):
            print(f"[{i}/{len(steps)}] {step.name}: done already", flush=True)
        lanes = [todo for lane in lanes if (todo := [s for s in lane if not (done_dir / s.name).exists()])]
        side_by_side = len(lanes) > 1
        start = time.monotonic()

        def launch(lane: list[Step], active_lanes: int):
            # the cores are shared among the lanes still running: a step that starts after
            # another lane finished gets its threads too, and a training step may grow back to
            # all cores when its neighbour finishes (AdaptiveThreads' max_threads)
            cores = os.cpu_count() or 1
            threads = max(1, cores // active_lanes)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MARS_MAX_THREADS": str(cores)} if side_by_side else None
            step = lane.pop(0)
            command = [sys.executable, *step.args()]
            if step.resume_from is not None and step.resume_from.exists():
                command.append(f"ckpt_path={step.resume_from}")
            log = out / f"{step.name}.log" if side_by_side else None
            print(f"[{i}/{len(steps)}] {step.name}: {shlex.join(command)}" + (f"  (output: {log})" if log else ""), flush=True)
            sink = open(log, "a") if log else None
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink and subprocess.STDOUT)
            if sink:
                sink.close()  # the child keeps its own handle
            return step, process, log, lane

        running = [launch(lane, len(lanes)) for lane in lanes]
        failed = []
        while running:  # report each step when it ends, then start the next one of its lane
            for entry in [e for e in running if e[1].poll() is not None]:
                running.remove(entry)
                step, process, log, lane = entry
                if process.returncode != 0:
                    failed.append(f"{step.name} (exit {process.returncode}{f', see {log}' if log else ''})")
                    continue
                (done_dir / step.name).touch()
                print(f"[{i}/{len(steps)}] {step.name}: finished in {time.monotonic() - start:.0f} s", flush=True)
                if lane:
                    running.append(launch(lane, len(running) + 1))
            time.sleep(0.2 if running else 0)
        if failed:
            raise SystemExit(f"demo step failed: {', '.join(failed)}; rerun to resume")


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_app(demo, cfg)


def demo(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir).resolve()
    start = time.monotonic()
    run_steps(demo_steps(cfg, out), out)
    print(f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min. Artifacts in {out}:")
    print(f"  MARS checkpoint:  {out / 'stage1' / 'mars'}")
    print(f"  stage III:        {out / 'stage3' / 'superres'}")
    print(f"  sample grid:      {out / 'samples' / 'grid.png'} (64 px beside 128 px)")
    print(f"  evaluation:       {out / 'eval_images' / 'base' / 'eval_summary.json'} (64 px), "
          f"{out / 'eval_images' / 'eval_summary.json'} (128 px, the cascade)")
    print(f"  captions:         {out / 'captions' / 'captions.jsonl'} (scores: caption_summary.json)")
    if cfg.with_stage2:
        print(f"  stage II:         {out / 'stage2' / 'mars'}, scored at each size: {out / 'eval_stage2'}/<WxH>/eval_summary.json")
    print(f"Draw with it:\n  python apps/generate.py ckpt={out / 'stage1' / 'mars'} prompt=\"a red circle above a blue square\"")
    print(f"  (at 128 px: add superres={out / 'stage3' / 'superres'} tokens_per_step={cfg.tokens_per_step} decode={cfg.decode})")


if __name__ == "__main__":
    main()

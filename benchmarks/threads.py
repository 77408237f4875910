"""Training speed beside a busy process, with and without ``AdaptiveThreads``, side by side in one run:

    python benchmarks/threads.py --demo artifacts/demo [--steps 200] [--rounds 1]

Trains ``experiment=shapes_stage1`` on a finished demo's tokenizer, text LLM and codes for
``--steps`` steps through ``apps/train.py``, four ways per round: alone and beside one busy
process (a pure-Python loop holding one core), each with the thread count left to
``AdaptiveThreads`` and fixed at torch's default. Steps/s is measured from the training step
after the first probe (step ``first_step + probes``) to the last; each setting reports its
slow-down beside the busy process relative to the fixed count alone (the target: at most 2.5x).
Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
FROM_STEP = 40  # after AdaptiveThreads' first probe (step 20, two counts of 6 steps)


class StepTimes(Callback):
    """Writes the wall-clock time of every training step's end to ``path`` (JSON) when fit ends."""

    def __init__(self, path: str) -> None:
        self.path, self.times = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.times))


def train(demo: Path, steps: int, adaptive: bool, busy: bool, work: Path) -> float:
    """Steps/s of one run from step FROM_STEP on."""
    times = work / f"times-{adaptive}-{busy}.json"
    command = [
        sys.executable, str(ROOT / "apps" / "train.py"), "experiment=shapes_stage1", "model.evaluator=null",
        f"model.llm_path={demo / 'lm' / 'llm'}", f"model.tokenizer_path={demo / 'tokenizer' / 'tokenizer'}",
        f"paths.data_dir={demo / 'data'}", f"trainer.max_steps={steps}", "trainer.max_time=null", "logger=csv",
        f"hydra.run.dir={work / 'run'}", "callbacks.model_checkpoint.every_n_train_steps=100000",
        "+callbacks.step_times._target_=benchmarks.threads.StepTimes", f"+callbacks.step_times.path={times}",
    ] + ([] if adaptive else ["~callbacks.adaptive_threads"])
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        subprocess.run(command, cwd=ROOT, env={"PYTHONPATH": str(ROOT), **_environ()}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if neighbour:
            neighbour.kill()
    ends = json.loads(times.read_text())[FROM_STEP:]
    return (len(ends) - 1) / (ends[-1] - ends[0])


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `make demo` output (artifacts/demo)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not (args.demo / "lm" / "llm").is_dir():
        raise SystemExit(f"--demo {args.demo}: no text LLM at lm/llm (run `make demo` first)")
    rates: dict[tuple[bool, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for adaptive in (False, True):
                for busy in (False, True):
                    rates.setdefault((adaptive, busy), []).append(train(args.demo, args.steps, adaptive, busy, Path(tmp)))
    best = {key: max(values) for key, values in rates.items()}
    reference = best[(False, False)]
    print(f"{'threads':<12}{'neighbour':<11}{'steps/s':>8}{'slow-down':>11}")
    for (adaptive, busy), rate in best.items():
        print(f"{'adaptive' if adaptive else 'fixed':<12}{'busy' if busy else 'none':<11}{rate:>8.2f}{reference / rate:>10.2f}x")


if __name__ == "__main__":
    main()

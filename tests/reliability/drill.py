"""Kill drills: a tiny training run killed with SIGKILL at several points, each time resumed from
its ``last.ckpt``, must end with the weights of an uninterrupted run of the same config.

After every kill: ``last.ckpt`` (when one was written) loads through the checkpoint reader the
apps use (weights only). After every start: no temporary file of a killed save remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from mars_app.checkpointing import safe_load
from mars_core.io import TMP_MARK

ROOT = Path(__file__).resolve().parents[2]


def train_process(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_ROOT": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "apps" / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's weights and the training state modules keep beside them (EMA, codebook usage)."""
    state = safe_load(checkpoint)
    tensors = dict(state["state_dict"])
    tensors.update({f"ema/{k}": v for k, v in state.get("ema", {}).items()})
    if "quantizer_usage" in state:
        tensors["quantizer_usage"] = state["quantizer_usage"]
    return tensors


def temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(f".*{TMP_MARK}*"))


def run_drill(args: list[str], kills: list[tuple[int, bool]], tmp: Path) -> dict:
    """Run ``args`` uninterrupted, then again killed at each (step, during_save) of ``kills``
    and resumed each time; returns what the caller asserts on."""
    reference = train_process([*args, "hydra.run.dir=reference"], tmp)
    assert reference.returncode == 0, reference.stderr[-4000:]
    checkpoints = tmp / "drill" / "checkpoints"
    last = checkpoints / "last.ckpt"
    report = {"kills": [], "stale_after_restart": [], "unloadable_last": []}
    for step, during_save in [*kills, (None, False)]:
        run = [*args, "hydra.run.dir=drill"]
        if last.exists():
            run.append(f"ckpt_path={last}")
        if step is not None:
            run += ["+callbacks.kill._target_=tests.reliability.killer.KillAt", f"+callbacks.kill.step={step}",
                    f"+callbacks.kill.during_save={during_save}"]
        proc = train_process(run, tmp)
        if step is None:
            assert proc.returncode == 0, proc.stderr[-4000:]
        else:
            assert proc.returncode == -signal.SIGKILL, f"not killed at step {step}: {proc.stderr[-4000:]}"
            report["kills"].append({"step": step, "during_save": during_save, "temporaries": len(temporaries(checkpoints))})
            if last.exists():
                try:
                    weights(last)
                except Exception as err:  # noqa: BLE001 - recorded, asserted by the caller
                    report["unloadable_last"].append(f"after kill at {step}: {err}")
    report["stale_after_restart"] = temporaries(checkpoints)
    expected, got = weights(tmp / "reference" / "checkpoints" / "last.ckpt"), weights(last)
    assert expected.keys() == got.keys()
    report["differences"] = {}  # largest absolute difference per group: weights, ema, quantizer_usage
    for key in expected:
        group = "ema" if key.startswith("ema/") else "quantizer_usage" if key == "quantizer_usage" else "weights"
        difference = (expected[key].double() - got[key].double()).abs().max().item()
        report["differences"][group] = max(difference, report["differences"].get(group, 0.0))
    report["reference_step"] = safe_load(tmp / "reference" / "checkpoints" / "last.ckpt")["global_step"]
    report["drill_step"] = safe_load(last)["global_step"]
    return report

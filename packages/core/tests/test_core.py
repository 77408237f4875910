"""mars_core: the schedule's shape and run length, atomic writing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mars_core import atomic_path, run_length, warmup_cosine, warmup_cosine_scheduler, write_json_atomic
from mars_core.io import remove_stale_temporaries


def test_warmup_then_cosine_to_the_floor():
    total, warmup = 100, 10
    factors = [warmup_cosine(s, total, warmup, 0.1) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way through the decay
    assert factors[total] == pytest.approx(0.1)
    assert warmup_cosine(50, total, warmup, 1.0) == 1.0  # constant after warm-up


def test_time_budget_moves_the_schedule_on():
    # a quarter of the steps but all of the time: the floor
    assert warmup_cosine(25, 100, 1, 0.1, done=1.0) == pytest.approx(0.1)


def trainer(max_steps=-1, estimated=float("inf")):
    return SimpleNamespace(max_steps=max_steps, estimated_stepping_batches=estimated, callbacks=[])


def test_run_length_from_max_steps_or_the_loader_or_a_clear_error():
    assert run_length(trainer(max_steps=300)) == 300
    assert run_length(trainer(estimated=120)) == 120
    with pytest.raises(ValueError, match="samples_per_epoch"):
        run_length(trainer())


def test_scheduler_drives_an_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_cosine_scheduler(opt, trainer(max_steps=20), warmup_ratio=0.1, min_lr_ratio=0.0)["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))
    with pytest.raises(ValueError, match="exactly one"):
        warmup_cosine_scheduler(opt, trainer(max_steps=20))


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a" / "metrics.json"
    write_json_atomic(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text().strip() == '{\n  "x": 1\n}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"x" * 10)
    (tmp_path / "last.ckpt").write_bytes(b"y")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.ckpt.tmp-123"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

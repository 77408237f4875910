"""mars_core: the schedule's shape and run length, atomic writing, the check of a given path."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mars_core import (
    atomic_path, build_optimizer, require_path, run_length, warmup_cosine, warmup_cosine_scheduler, write_json_atomic,
)
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


def test_optimizer_groups_decay_matrices_only_and_scale_the_new_parts():
    model = torch.nn.ModuleDict({
        "proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4), "token_embed": torch.nn.Embedding(5, 4),
        "hint_table": torch.nn.Embedding(3, 4), "frozen": torch.nn.Linear(4, 4),
    })
    model["frozen"].requires_grad_(False)
    partial = lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)  # noqa: E731
    opt = build_optimizer(partial, model.named_parameters(), new_parts=("hint_",), new_lr_scale=5.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    group = lambda p: by_param[id(p)]  # noqa: E731
    assert id(model["frozen"].weight) not in by_param
    assert (group(model["proj"].weight)["weight_decay"], group(model["proj"].weight)["lr"]) == (0.1, 1e-3)
    for p in (model["proj"].bias, model["norm"].weight, model["token_embed"].weight):
        assert (group(p)["weight_decay"], group(p)["lr"]) == (0.0, 1e-3)
    assert (group(model["hint_table"].weight)["weight_decay"], group(model["hint_table"].weight)["lr"]) == (0.0, pytest.approx(5e-3))
    assert all("lr_scale" not in g for g in opt.param_groups)
    # the schedule scales each group from its own peak
    sched = warmup_cosine_scheduler(opt, trainer(max_steps=10), warmup_steps=1, min_lr_ratio=0.5)["scheduler"]
    for _ in range(10):
        opt.step()
        sched.step()
    assert group(model["hint_table"].weight)["lr"] == pytest.approx(2.5e-3)
    assert group(model["proj"].weight)["lr"] == pytest.approx(5e-4)


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


def test_require_path_names_the_option_for_an_unset_or_missing_path(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"")
    assert require_path("model.llm_path", str(tmp_path), "the LLM") == tmp_path
    assert require_path("fid.weights", tmp_path / "weights.pth", "the weights", directory=False) == tmp_path / "weights.pth"
    for unset in (None, "", "???"):
        with pytest.raises(ValueError, match=r"^model\.llm_path is not set: give the LLM \(model\.llm_path=/path\); see X$"):
            require_path("model.llm_path", unset, "the LLM", hint="; see X")
    with pytest.raises(FileNotFoundError, match=r"^model\.llm_path=.*weights\.pth: no such directory \(the LLM\)$"):
        require_path("model.llm_path", tmp_path / "weights.pth", "the LLM")  # a file where a directory belongs
    with pytest.raises(FileNotFoundError, match=r"^fid\.weights=.*: no such file \(the weights\)$"):
        require_path("fid.weights", tmp_path, "the weights", directory=False)

"""make demo: its steps are the project's own commands, and a rerun resumes where it stopped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apps.demo import Step, demo_steps, run_steps, train_step

ROOT = Path(__file__).resolve().parents[1]


def test_demo_steps_are_the_projects_own_commands(make_cfg, tmp_path):
    cfg = make_cfg(["seed=7"], config_name="demo")
    groups = demo_steps(cfg, tmp_path)
    tokenizer_lane, lm_lane = groups[0]  # independent: side by side
    assert [s.name for s in tokenizer_lane] == ["tokenizer", "codes"]
    assert [s.name for s in lm_lane] == ["lm", "eval_prompts", "eval_scenes", "renders_128", "renders_stage1"]
    triplets_lane, stage1_step = groups[1]  # side by side too
    assert [s.name for s in triplets_lane] == ["triplets"] and stage1_step.name == "stage1"
    assert [s.name for s in groups[2]] == ["stage3", "captions"]  # no stage II unless asked for
    steps = flat(groups)
    assert [s.name for s in steps][:10] == ["tokenizer", "codes", "lm", "eval_prompts", "eval_scenes", "renders_128", "renders_stage1", "triplets", "stage1", "stage3"]
    assert [s.name for s in groups[3]] == ["generate_eval", "samples"]
    assert [s.name for s in steps][-1] == "evaluate_captions"
    for step in steps:
        args = step.args()
        assert args[0] == "-m" or Path(args[0]).is_file(), args
    codes = next(s for s in steps if s.name == "codes").args()  # stage I's scenes are square: the tokenizer's are not
    assert f"input={tmp_path / 'data' / 'shapes_stage1'}" in codes and "64,128" in next(s for s in steps if s.name == "renders_stage1").args()
    stage1 = next(s for s in steps if s.name == "stage1").args()
    assert "experiment=shapes_stage1" in stage1 and f"model.llm_path={tmp_path / 'lm' / 'llm'}" in stage1
    assert all("seed=7" in s.args() for s in steps if s.name in ("tokenizer", "lm", "stage1", "stage3"))
    stage3 = next(s for s in steps if s.name == "stage3").args()
    assert "experiment=shapes_stage3" in stage3 and f"model.base_path={tmp_path / 'stage1' / 'mars'}" in stage3
    cascade = next(s for s in steps if s.name == "generate_eval").args()
    assert f"superres={tmp_path / 'stage3' / 'superres'}" in cascade and "tokens_per_step=4" in cascade


def flat(groups) -> list[Step]:
    return [s for g in groups for e in (g if isinstance(g, tuple) else (g,)) for s in (e if isinstance(e, list) else [e])]


def test_demo_with_stage2_trains_it_beside_stage3_and_scores_every_size(make_cfg, tmp_path):
    cfg = make_cfg(["with_stage2=true", "stage2_aspect_ratios=[1:1,2:1]"], config_name="demo")
    groups = demo_steps(cfg, tmp_path)
    assert [s.name for s in groups[0][1]] == ["lm", "eval_prompts", "eval_scenes", "renders_128", "renders_stage1", "renders_ar"]
    assert [s.name for s in groups[1][0]] == ["triplets", "codes_ar"]
    stage3, captions, stage2_lane = groups[2]
    assert captions.name == "captions"
    assert stage3.name == "stage3" and [s.name for s in stage2_lane] == [
        "stage2", "generate_stage2_64x64", "evaluate_stage2_64x64", "generate_stage2_128x64", "evaluate_stage2_128x64"]
    stage2 = stage2_lane[0].args()
    assert "experiment=shapes_stage2" in stage2 and f"model.init_from={tmp_path / 'stage1' / 'mars' / 'semvie'}" in stage2
    assert "model.resolutions=[64x64,128x64]" in stage2 and stage2_lane[0].resume_from == tmp_path / "stage2" / "checkpoints" / "last.ckpt"
    assert "resolutions=[64x64,128x64]" in next(s for s in flat(groups) if s.name == "codes_ar").args()
    assert "resolution=128x64" in stage2_lane[3].args() and f"ckpt={tmp_path / 'stage2' / 'mars'}" in stage2_lane[3].args()
    assert f"images={tmp_path / 'eval_stage2' / '128x64'}" in stage2_lane[4].args()


def test_a_rerun_skips_finished_steps_and_resumes_training_from_its_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    record = lambda name: Step(name, lambda: ["-c", f"import sys; open({str(log)!r}, 'a').write({name!r} + ' ' + ' '.join(sys.argv[1:]) + '\\n')"])
    run_steps([record("a")], tmp_path)
    run_steps([record("a"), record("b")], tmp_path)  # "a" finished: not run again
    assert log.read_text().splitlines() == ["a ", "b "]

    step = train_step("stage", [], tmp_path, seed=0)
    checkpoint = step.resume_from
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    step.args = lambda: ["-c", f"import sys; open({str(log)!r}, 'a').write(sys.argv[-1] + '\\n')"]
    run_steps([step], tmp_path)
    assert log.read_text().splitlines()[-1] == f"ckpt_path={checkpoint}"


def test_steps_side_by_side_share_the_cores_and_log_to_files(tmp_path):
    script = "import os, sys; print(sys.argv[1], os.environ['OMP_NUM_THREADS'], os.environ['MARS_MAX_THREADS'])"
    write = lambda name: Step(name, lambda: ["-c", script, name])
    run_steps([(write("a"), write("b"))], tmp_path)
    cores = str(os.cpu_count() or 1)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    # a share of the cores, all of them as the most a training step's AdaptiveThreads tries
    assert (tmp_path / "a.log").read_text().split() == ["a", threads, cores]
    assert (tmp_path / "b.log").read_text().split() == ["b", threads, cores]
    assert (tmp_path / ".done" / "a").exists() and (tmp_path / ".done" / "b").exists()

    # a lane: "f" starts when "e" has finished, while "g" runs beside them
    order = tmp_path / "order.txt"
    order.touch()
    wait = "import time\nfor _ in range(200):\n    if {!r} in open({!r}).read(): break\n    time.sleep(0.1)\nelse: raise SystemExit('timeout')\n"
    append = lambda name, after: Step(name, lambda: ["-c", (wait.format(after, str(order)) if after else "") + f"open({str(order)!r}, 'a').write({name!r})"])
    started = Step("g", lambda: ["-c", f"open({str(order)!r}, 'a').write('<')\n" + wait.format("f", str(order)) + f"open({str(order)!r}, 'a').write('g')"])
    run_steps([([append("e", "<"), append("f", None)], started)], tmp_path)
    assert order.read_text() == "<efg"

    # the next step of a lane gets the cores of lanes that have finished
    wait_done = f"import os, time\nwhile not os.path.exists({str(tmp_path / '.done' / 'quick')!r}):\n    time.sleep(0.1)\n"
    waits = Step("waits", lambda: ["-c", wait_done])
    run_steps([([waits, write("next")], write("quick"))], tmp_path)
    assert (tmp_path / "quick.log").read_text().split() == ["quick", threads, cores]
    assert (tmp_path / "next.log").read_text().split() == ["next", cores, cores]

    fail = Step("c", lambda: ["-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="c \\(exit 3"):
        run_steps([(write("d"), fail)], tmp_path)
    assert (tmp_path / ".done" / "d").exists() and not (tmp_path / ".done" / "c").exists()

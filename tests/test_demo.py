"""make demo: its steps are the project's own commands, and a rerun resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

from apps.demo import Step, demo_steps, run_steps, train_step

ROOT = Path(__file__).resolve().parents[1]


def test_demo_steps_are_the_projects_own_commands(make_cfg, tmp_path):
    cfg = make_cfg([], config_name="demo")
    steps = demo_steps(cfg, tmp_path)
    assert [s.name for s in steps][:3] == ["eval_prompts", "tokenizer", "lm"]
    (tmp_path / "data" / "shapes" / "train-10-abc").mkdir(parents=True)  # what the tokenizer run leaves
    for step in steps:
        args = step.args()
        assert args[0] == "-m" or Path(args[0]).is_file(), args
    stage1 = next(s for s in steps if s.name == "stage1").args()
    assert "experiment=shapes_stage1" in stage1 and f"model.llm_path={tmp_path / 'lm' / 'llm'}" in stage1


def test_a_rerun_skips_finished_steps_and_resumes_training_from_its_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    record = lambda name: Step(name, lambda: ["-c", f"import sys; open({str(log)!r}, 'a').write({name!r} + ' ' + ' '.join(sys.argv[1:]) + '\\n')"])
    run_steps([record("a")], tmp_path)
    run_steps([record("a"), record("b")], tmp_path)  # "a" finished: not run again
    assert log.read_text().splitlines() == ["a ", "b "]

    step = train_step("stage", [], tmp_path)
    checkpoint = step.resume_from
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    step.args = lambda: ["-c", f"import sys; open({str(log)!r}, 'a').write(sys.argv[-1] + '\\n')"]
    run_steps([step], tmp_path)
    assert log.read_text().splitlines()[-1] == f"ckpt_path={checkpoint}"

"""Each package installs alone into a fresh environment that holds only torch, imports, pulls
no torchvision, and passes its own tests there. Slow (creates venvs, installs from PyPI):
run with `pytest -m slow tests/test_packaging.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Siblings are not on PyPI: a package's MARS dependencies (core; tokenizer and semvie for superres) are installed from the tree too.
INSTALL = {
    "core": ["packages/core"],
    "tokenizer": ["packages/core", "packages/tokenizer"],
    "semvie": ["packages/core", "packages/semvie"],
    "data": ["packages/core", "packages/data"],
    "superres": ["packages/core", "packages/tokenizer", "packages/semvie", "packages/superres"],
}


def sh(*args: str | Path, cwd: Path = ROOT) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("package", sorted(INSTALL))
def test_package_installs_alone_and_passes_its_tests(package, tmp_path):
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    sh(python, "-m", "pip", "install", "--quiet", "torch==2.13.0")
    sh(python, "-m", "pip", "install", "--quiet", *INSTALL[package], "pytest")
    sh(python, "-c", f"import mars_{package}")
    installed = {line.split("==")[0].split(" @ ")[0] for line in sh(python, "-m", "pip", "freeze").lower().splitlines()}
    assert "torchvision" not in installed
    assert {name for name in installed if name.startswith("mars")} == {f"mars-{Path(p).name}" for p in INSTALL[package]}
    tests = ROOT / "packages" / package / "tests"
    if any(tests.glob("test_*.py")):
        sh(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-m", "not slow and not gpu", tests)

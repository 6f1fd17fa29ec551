"""The house style, where a tool can check it: ``ruff check`` with the configuration in pyproject.toml."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["core", "pipeline", "storage", "stage1_extract", "stage2_pretrain", "bench", "tests"]
if importlib.util.find_spec("ruff") is not None:
    RUFF = [sys.executable, "-m", "ruff"]
else:
    RUFF = [shutil.which("ruff")] if shutil.which("ruff") else None

pytestmark = pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[dev]')")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUFF, "check", "--no-cache", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_code_passes_ruff():
    folders = [f for f in CHECKED if (ROOT / f).is_dir()]
    done = _ruff("--output-format", "concise", *folders)
    assert done.returncode == 0, f"ruff check {' '.join(folders)}:\n{done.stdout}{done.stderr}"


def test_the_configuration_bans_relative_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .sibling import thing\n\nprint(thing)\n")
    done = _ruff("--config", str(ROOT / "pyproject.toml"), "--output-format", "concise", str(bad))
    assert done.returncode == 1 and "TID252" in done.stdout, done.stdout + done.stderr

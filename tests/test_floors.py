"""Floors: a module imports only from its own floor or lower ones (docs/ARCHITECTURE.md, "Folders and floors").

core <- storage <- stage1_extract, stage2_pretrain (never each other) <- pipeline.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "stage1_extract": {"core", "storage", "stage1_extract"},
    "stage2_pretrain": {"core", "storage", "stage2_pretrain"},
    "pipeline": {"core", "storage", "stage1_extract", "stage2_pretrain", "pipeline"},
}


def _imported_folders(path: Path):
    """(line, folder) for every ``cocomix.<folder>`` a module imports (top level or inside functions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cocomix" and len(parts) > 1 and parts[1] in ALLOWED:
                yield node.lineno, parts[1]


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_imports_stay_on_their_floor_or_below(floor):
    bad = sorted({f"{path.relative_to(ROOT)}:{line} imports cocomix.{folder}"
                  for path in (ROOT / floor).rglob("*.py")
                  for line, folder in _imported_folders(path) if folder not in ALLOWED[floor]})
    assert not bad, "imports from a higher floor:\n" + "\n".join(bad)


def test_every_package_folder_has_a_floor():
    packages = re.findall(r'"cocomix\.(\w+)" = "', (ROOT / "pyproject.toml").read_text())
    assert set(packages) == set(ALLOWED), set(packages) ^ set(ALLOWED)

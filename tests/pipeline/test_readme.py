"""The README's two set-up commands stay true: CI runs the very same test command."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_cmds = [line for block in _bash_blocks(readme) for line in block.splitlines() if "pytest" in line]
    assert len(test_cmds) == 1, test_cmds
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0].strip() in ci_lines


def test_readme_commands_exist():
    """Every `cocomix X` the README shows is a registered command."""
    from cocomix.pipeline.cli import COMMANDS

    code = "\n".join(_bash_blocks((ROOT / "README.md").read_text()))
    known = {name.split()[0] for name in COMMANDS}
    used = set(re.findall(r"(?:^|&& |cli )cocomix ([a-z]+)", code, flags=re.M)) | set(re.findall(r"cli ([a-z]+)", code))
    assert used and used <= known, used - known

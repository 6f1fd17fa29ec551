"""The CLI: flags are pinned to config fields, user errors are one line with exit 2."""
from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from cocomix.pipeline.cli import COMMANDS, app
from cocomix.pipeline.configs import flag_name, resolve

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_flags_are_config_fields(name):
    """Every config field is a flag (or argument) of its command, with help text, and nothing else is."""
    _, config_cls, _ = COMMANDS[name]
    result = runner.invoke(app, [*name.split(), "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for field in dataclasses.fields(config_cls):
        assert field.metadata.get("help"), f"{config_cls.__name__}.{field.name} has no help text"
        if not field.metadata.get("positional"):
            assert flag_name(field.name) in result.output, f"{flag_name(field.name)} missing from `cocomix {name} --help`"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_run_functions_resolve(name):
    _, _, run = COMMANDS[name]
    assert callable(resolve(run))


def test_config_error_is_one_line_exit_2():
    result = runner.invoke(app, ["extract", "--tokens", "x", "--selection", "nope"])
    assert result.exit_code == 2
    assert "--selection" in result.output and "Traceback" not in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("cocomix ")

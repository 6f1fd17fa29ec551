"""The CLI: flags are pinned to config fields, user errors are one line with exit 2."""
from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from cocomix.core.configs import flag_name, resolve
from cocomix.pipeline.cli import COMMANDS, app

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


def test_os_errors_are_one_line_exit_2(tmp_path, token_store):
    """A path that cannot be created (here: under a regular file) is the user's to fix: one line."""
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, ["pretrain", "--method", "ntp", "--size", "tiny", "--tokens", str(token_store),
                                 "--out", str(tmp_path / "file" / "run"), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert "Not a directory" in result.output and "Traceback" not in result.output


def test_ctrl_c_stops_with_the_way_to_continue(tmp_path, token_store):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cocomix.pipeline.cli", "pretrain", "--method", "ntp", "--size", "tiny", "--tokens",
           str(token_store), "--out", str(out), "--max-steps", "100000", "--save-every", "1", "--eval-every", "0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*/complete")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted" in output and "--resume" in output and "Traceback" not in output


def test_inspect_negative_samples_names_the_flag():
    result = runner.invoke(app, ["inspect", "x", "--samples", "-1"])
    assert result.exit_code == 2 and "--samples" in result.output

"""Progress when output is not a terminal (batch jobs, ``> log 2>&1``): plain lines, not a silent live bar.

A rich live bar on a non-terminal console prints nothing until it stops; every long command
(tokenize, extract, sae train, the SAE download) instead logs one plain line per
``COCOMIX_PROGRESS_EVERY`` seconds and one at the end (cocomix.core.progress).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.progress import Progress

from cocomix.core.errors import ConfigError
from cocomix.core.progress import BYTES, EVERY_ENV, PlainProgress, progress_display

LINE = re.compile(r"^tokenize  (\d+)/(\d+|\?) docs  ([\d,.]+) docs/s  elapsed \d+:\d\d:\d\d(  ETA \d+:\d\d:\d\d)?  [\d,]+ tok/s$")


def run_cli(log_path, *args: str, every: str = "0") -> tuple[int, str]:
    """The CLI in a child process whose stdout and stderr go to one file, like a Slurm job's log."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env[EVERY_ENV] = every
    with open(os.devnull, "rb") as stdin, open(log_path, "w") as log:
        child = subprocess.run([sys.executable, "-c", "from cocomix.pipeline.cli import main; main()", *args],
                               stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    return child.returncode, log_path.read_text()


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_tokenize_to_a_file_logs_plain_progress_lines_before_the_summary(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "tokens"
    rc, text = run_cli(tmp_path / "log", "tokenize", "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_dir),
                       "--out", str(out), "--batch-size", "10")
    assert rc == 0, text
    lines = progress_lines(text)
    assert len(lines) >= 6, text  # 60 documents in batches of 10, one line per batch with every=0, plus the final one
    done = [int(m.group(1)) for m in lines]
    assert done == sorted(done) and done[0] == 10 and done[-1] == 60, text
    assert all(m.group(2) == "60" and m.group(4) for m in lines), "total known for a .txt folder: done/total and ETA"
    assert all(float(m.group(3).replace(",", "")) > 0 for m in lines)
    summary = text.index("token store")
    assert all(text.index(m.group(0)) < summary for m in lines), text
    assert "━" not in text.split("token store")[0], "no live bar in a log file"


def test_tokenize_jsonl_has_unknown_total_rate_and_elapsed_but_no_eta(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: the model and the token " * 5}) + "\n" for i in range(30)))
    rc, text = run_cli(tmp_path / "log", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir),
                       "--out", str(tmp_path / "t"), "--batch-size", "10")
    assert rc == 0, text
    lines = progress_lines(text)
    assert [m.group(1) for m in lines][-1] == "30" and lines, text
    assert all(m.group(2) == "?" and m.group(4) is None for m in lines), text


def test_default_interval_prints_only_the_final_line_of_a_short_run(tmp_path, corpus_dir, tokenizer_dir):
    rc, text = run_cli(tmp_path / "log", "tokenize", "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_dir),
                       "--out", str(tmp_path / "t"), "--batch-size", "10", every="30")
    assert rc == 0, text
    assert [m.group(1) for m in progress_lines(text)] == ["60"], text


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def plain(unit: str = "tok", every: float = 30, extra: str = "", **kw) -> tuple[PlainProgress, Clock, io.StringIO]:
    clock, buf = Clock(), io.StringIO()
    console = Console(file=buf, width=40)  # narrower than any line: plain lines must not be wrapped or cut
    return PlainProgress(unit=unit, extra=extra, every=every, console=console, get_time=clock, **kw), clock, buf


def test_reporter_rate_eta_and_interval():
    bar, clock, buf = plain(extra="{task.fields[stats]}")
    with bar:
        task = bar.add_task("sae train", total=10_000, completed=1_000, stats="")  # 1,000 done by an earlier run
        clock.t += 10
        bar.update(task, advance=500, stats="fvu 0.500")
        assert buf.getvalue() == "", "nothing before the interval has passed"
        clock.t += 20
        bar.update(task, advance=1_000, stats="fvu 0.250  l0 32.0  dead 1.0%")
        clock.t += 5
        bar.advance(task, 100)
    lines = buf.getvalue().splitlines()
    # 1,500 tokens this run in 30 s = 50 tok/s; 7,500 left at 50 tok/s = 150 s
    assert lines[0] == "sae train  2,500/10,000 tok  50 tok/s  elapsed 0:00:30  ETA 0:02:30  fvu 0.250  l0 32.0  dead 1.0%"
    # final line at stop: 1,600 in 35 s = 45.7 tok/s; 7,400 left -> ceil(161.875) s
    assert lines[1] == "sae train  2,600/10,000 tok  45.7 tok/s  elapsed 0:00:35  ETA 0:02:42  fvu 0.250  l0 32.0  dead 1.0%"
    assert len(lines) == 2


def test_reporter_unknown_total_bytes_and_finished():
    bar, clock, buf = plain(unit=BYTES, every=0)
    with bar:
        task = bar.add_task("5.pt", total=None)
        clock.t += 4
        bar.update(task, advance=2_000_000)
    assert buf.getvalue().splitlines() == ["5.pt  2.0 MB/?  500.0 kB/s  elapsed 0:00:04"] * 2
    bar, clock, buf = plain(every=0)
    with bar:
        task = bar.add_task("extract", total=100)
        bar.advance(task, 0)  # no time has passed: no rate yet, no ETA
        clock.t += 2
        bar.advance(task, 100)
    assert buf.getvalue().splitlines() == [
        "extract  0/100 tok  0 tok/s  elapsed 0:00:00  ETA -:--:--",
        "extract  100/100 tok  50 tok/s  elapsed 0:00:02  ETA 0:00:00",
        "extract  100/100 tok  50 tok/s  elapsed 0:00:02  ETA 0:00:00",
    ]


def test_disabled_reporter_prints_nothing():
    bar, clock, buf = plain(every=0, disable=True)  # ranks other than 0
    with bar:
        task = bar.add_task("extract", total=10)
        clock.t += 1
        bar.advance(task, 5)
    assert buf.getvalue() == ""


def test_terminal_keeps_the_rich_bar_and_a_file_gets_plain_lines():
    assert type(progress_display(unit="tok", console=Console(file=io.StringIO(), force_terminal=True))) is Progress
    assert isinstance(progress_display(unit="tok", console=Console(file=io.StringIO())), PlainProgress)


def test_bad_interval_is_a_config_error(monkeypatch):
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(ConfigError, match=EVERY_ENV):
        progress_display(unit="tok", console=Console(file=io.StringIO()))


def test_sae_train_and_extract_displays_log_plain_lines(monkeypatch):
    from cocomix.core import logs
    from cocomix.stage1_extract.report import ExtractProgress
    from cocomix.stage1_extract.sae.progress import SaeTrainProgress

    buf = io.StringIO()
    monkeypatch.setattr(logs.console, "_file", buf)  # not the `file` property: teardown would pin the captured stream
    monkeypatch.setattr(logs.console, "_force_terminal", False)
    monkeypatch.setenv(EVERY_ENV, "0")
    with SaeTrainProgress(4_003_840) as bar:
        bar.advance(4096, SimpleNamespace(fvu=0.25, l0=32.0), 0.01)
    with ExtractProgress(2048, 2, enabled=True) as bar:
        bar.tokens_done(1024)
        bar.shard_done()
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(r"sae train  4,096/4,003,840 tok  [\d,.]+ tok/s  elapsed 0:00:00  ETA \d+:\d\d:\d\d  "
                        r"fvu 0\.250  l0 32\.0  dead 1\.0%", lines[0]), lines
    assert any(re.fullmatch(r"extract  1,024/2,048 tok  [\d,.]+ tok/s  elapsed 0:00:00  ETA \d+:\d\d:\d\d  1/2 shards", s)
               for s in lines), lines

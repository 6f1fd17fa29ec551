"""The check-ahead helper: it verifies blocks on another core in the loader's order, the loader
then skips them, and nothing it does (or fails to do) can let a bad block through."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from catalogue import corrupt

from cocomix.core.errors import IntegrityError
from cocomix.stage2_pretrain.data import DataState, TargetSource, TrainStream
from cocomix.storage import block_ahead, block_check
from cocomix.storage.targets import TargetReader, TargetWriter, id_dtype, plan_shards

WINDOW, K, N_LATENTS, BLOCK = 128, 4, 1000, 64
N_TOKENS = 16 * 1024  # 8 shards of 2048 rows, 256 blocks of 64 rows


def write_folder(out, n_tokens: int = N_TOKENS) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 500, n_tokens).astype(np.uint16)
    plan = plan_shards({"train": n_tokens}, WINDOW, 16)
    with TargetWriter(out, meta={"sae": {"n_latents": N_LATENTS}, "window": WINDOW}, plan=plan, k_attr=K,
                      id_dtype=id_dtype(N_LATENTS), score_dtype="float32", token_dtype=np.uint16) as w:
        for spec in plan:
            w.claim(spec)
            ids = rng.integers(0, N_LATENTS, (spec.rows, K)).astype(id_dtype(N_LATENTS))
            w.write_shard(spec, tokens[spec.start:spec.end], ids, rng.random((spec.rows, K), dtype=np.float32))
        w.finalize()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(block_check, "BLOCK_ROWS", BLOCK)
    write_folder(tmp_path / "t")
    return tmp_path / "t"


@pytest.fixture
def ahead_on(monkeypatch):
    monkeypatch.setenv("COCOMIX_CHECK_AHEAD", "1")


def stream_over(reader) -> TrainStream:
    return TrainStream(TargetSource(reader, "train"), context=WINDOW, micro=4, accum=1, world=1, rank=0, seed=0,
                       offsets=reader.offsets)


def wait_for(flags, want: int, timeout: float = 60.0) -> np.ndarray:
    """The shared flags once ``want`` of them are set (the helper is a process that spawns first)."""
    deadline = time.monotonic() + timeout
    while True:
        marks = np.frombuffer(flags.memory.buf, np.uint8)[:flags.n_flags].copy()
        if marks.sum() >= want or time.monotonic() > deadline:
            return marks
        time.sleep(0.05)


def brute_first_touch(lay, starts, context):
    out, seen = [], set()
    bounds = [(int(lay.base[i]) + b, int(lay.starts[i]) + b * lay.block_rows,
               min(int(lay.starts[i]) + (b + 1) * lay.block_rows, int(lay.ends[i])))
              for i in range(len(lay.starts)) for b in range(-(-int(lay.ends[i] - lay.starts[i]) // lay.block_rows))]
    for s in starts:
        e = min(s + context, int(lay.ends[-1]))
        for g, lo, hi in bounds:  # blocks in id order, which is row order
            if lo < e and s < hi and g not in seen:
                seen.add(g)
                out.append(g)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_first_touch_matches_a_brute_force_scan(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 300, 7)  # uneven shards: windows cross shard ends, last blocks are short
    start = int(rng.integers(0, 50))
    bounds = np.concatenate([[start], start + np.cumsum(sizes)])
    entries = [{"start": int(a), "end": int(b), "rows": int(b - a), block_check.KEY: {"rows_per_block": 32}}
               for a, b in zip(bounds[:-1], bounds[1:])]
    lay = block_ahead.layout(entries, flag_base=0)
    context = int(rng.integers(1, 120))
    starts = rng.integers(start, bounds[-1] - 1, 200)
    assert block_ahead.first_touch(lay, starts, context).tolist() == brute_first_touch(lay, starts.tolist(), context)


def test_sets_without_block_checksums_get_no_layout():
    entries = [{"start": 0, "end": 10, "rows": 10, block_check.KEY: {"rows_per_block": 4}}, {"start": 10, "end": 20, "rows": 10}]
    assert block_ahead.layout(entries, 0) is None


def test_the_helper_verifies_every_block_ahead_and_the_loader_then_skips_them(folder, ahead_on, monkeypatch):
    reader = TargetReader.open(folder)
    stream = stream_over(reader)
    state = stream.next_step(DataState()).state  # registers the split and hands the helper the next windows
    flags = reader._ahead["train"]
    assert flags is not None and flags.n_flags == N_TOKENS // BLOCK
    marks = wait_for(flags, flags.n_flags)
    assert marks.all(), f"the helper verified {int(marks.sum())} of {flags.n_flags} blocks"
    deadline = time.monotonic() + 10
    while not reader.ahead_verified("train", 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader.ahead_verified("train", 0)  # so the stream hands on nothing more of this set
    real, calls = block_check._crc, []
    monkeypatch.setattr(block_check, "_crc", lambda rows: calls.append(len(rows)) or real(rows))
    batches = []
    for _ in range(N_TOKENS // WINDOW // 4 - 1):  # the rest of the epoch
        step = stream.next_step(state)
        state = step.state
        batches.append(step.micro_batches[0])
    assert calls == [], "the loader re-checked blocks the helper had verified"
    # what the loader hands on is unchanged by who checked it
    plain = stream_over(TargetReader.open(folder))
    again = plain.next_step(DataState()).state
    for got in batches:
        want = plain.next_step(again)
        again = want.state
        assert (got.input_ids == want.micro_batches[0].input_ids).all() and (got.concept_ids == want.micro_batches[0].concept_ids).all()


def test_a_rotten_block_is_left_for_the_loader_to_refuse(folder, ahead_on):
    import pyarrow as pa

    entry = next(e for e in TargetReader.open(folder).manifest["shards"] if e["index"] == 3)
    file = folder / entry["path"]
    table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()
    ids = table.column("concept_ids").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    row = 5 * BLOCK + 7
    needle = ids[row:row + 4].tobytes()
    data = file.read_bytes()
    assert data.count(needle) == 1
    corrupt(file, flip_at=data.find(needle))  # size and mtime kept: the identity and the stamp still match

    reader = TargetReader.open(folder)
    reader.check_ahead("train", ("token", "concept_ids"), np.arange(0, N_TOKENS, WINDOW), WINDOW)
    flags = reader._ahead["train"]
    wait_for(flags, flags.n_flags - 1)
    time.sleep(0.5)  # the helper has finished its list (one block per few microseconds)
    marks = np.frombuffer(flags.memory.buf, np.uint8)[:flags.n_flags].copy()
    bad = int(reader._ahead["train"].shards[entry["path"]][0]) + 5
    assert marks[bad] == 0 and marks.sum() == flags.n_flags - 1
    with pytest.raises(IntegrityError, match=rf"{entry['path']} .* rows \[{5 * BLOCK}, {6 * BLOCK}\) of column 'concept_ids' fail their CRC32C"):
        reader.window("train", entry["start"] + row, entry["start"] + row + 2, check=("token", "concept_ids"))


def test_a_replaced_file_does_not_inherit_the_helpers_flags(folder, ahead_on, monkeypatch):
    reader = TargetReader.open(folder)
    reader.check_ahead("train", ("token", "concept_ids"), np.arange(0, N_TOKENS, WINDOW), WINDOW)
    flags = reader._ahead["train"]
    assert wait_for(flags, flags.n_flags).all()
    entry = reader._by_set[("train", 0)][2]
    file = folder / entry["path"]
    file.write_bytes(file.read_bytes())  # same bytes, a new mtime: not the file the helper checked
    real, calls = block_check._crc, []
    monkeypatch.setattr(block_check, "_crc", lambda rows: calls.append(len(rows)) or real(rows))
    reader.window("train", entry["start"], entry["start"] + 10, check=("token", "concept_ids"))
    assert len(calls) == 2  # token and concept_ids of block 0, checked by the loader itself
    reader.window("train", 0, 10, check=("token", "concept_ids"))
    assert len(calls) == 2  # an unchanged shard still trusts the helper


def test_small_splits_one_cpu_or_switched_off_mean_no_helper(folder, monkeypatch):
    monkeypatch.setenv("COCOMIX_CHECK_AHEAD", "0")
    assert not TargetReader.open(folder).check_ahead("train", ("token", "concept_ids"), np.arange(4), WINDOW)
    monkeypatch.setenv("COCOMIX_CHECK_AHEAD", "1")
    monkeypatch.setattr(block_ahead, "MIN_BLOCKS", N_TOKENS // BLOCK + 1)
    assert not TargetReader.open(folder).check_ahead("train", ("token", "concept_ids"), np.arange(4), WINDOW)
    monkeypatch.delenv("COCOMIX_CHECK_AHEAD")
    monkeypatch.setattr(block_ahead.os, "sched_getaffinity", lambda pid: {0})
    assert not block_ahead.enabled()


def test_the_helper_leaves_with_its_parent_and_leaks_nothing(folder):
    """A parent killed outright takes the helper with it; one that exits normally leaves no shared memory behind."""
    script = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        from cocomix.storage.targets import TargetReader
        from cocomix.storage import block_ahead
        reader = TargetReader.open({str(folder)!r})
        assert reader.check_ahead("train", ("token", "concept_ids"), np.arange(0, {N_TOKENS}, {WINDOW}), {WINDOW})
        flags = reader._ahead["train"]
        deadline = time.monotonic() + 60
        while np.frombuffer(flags.memory.buf, np.uint8)[:flags.n_flags].sum() < flags.n_flags and time.monotonic() < deadline:
            time.sleep(0.05)
        print(block_ahead.helper().process.pid, flags.memory.name, flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), 9)
    """)
    env = {"COCOMIX_CHECK_AHEAD": "1"}
    import os

    for how in ("kill", "exit"):
        done = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})
        pid, name = done.stdout.split()
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}"), f"the helper outlived its parent ({how})"
        if how == "exit":
            assert done.returncode == 0, done.stderr
            assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert not os.path.exists(f"/dev/shm/{name.lstrip('/')}")


def test_no_shared_memory_means_the_loader_checks_alone(folder, ahead_on, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device: '/dev/shm'")

    monkeypatch.setattr(block_ahead, "_Memory", refuse)
    reader = TargetReader.open(folder)
    assert not reader.check_ahead("train", ("token", "concept_ids"), np.arange(0, N_TOKENS, WINDOW), WINDOW)
    assert len(reader.window("train", 0, WINDOW, check=("token", "concept_ids")).tokens) == WINDOW

"""Bit rot is caught where target rows are read: block CRC32Cs recorded by the writer, checked on first read."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from catalogue import assert_one_line_error, corrupt, run_cli
from test_verify_inspect import targets  # noqa: F401 - the finished target folder fixture

from cocomix.core.errors import IntegrityError
from cocomix.storage import block_check
from cocomix.storage.targets import TargetReader

SHARD = "train/shard-00001.arrow"


@pytest.fixture
def copy(tmp_path, targets):  # noqa: F811
    return shutil.copytree(targets, tmp_path / "t", copy_function=shutil.copy2)


def entry_of(folder, path=SHARD) -> dict:
    return next(e for e in json.loads((folder / "manifest.json").read_text())["shards"] if e["path"] == path)


def flip_in_ids(folder, row: int) -> None:
    """Flip a byte of row ``row``'s first label, keeping the file's size and mtime (the stamp still vouches)."""
    import pyarrow as pa

    file = folder / SHARD
    table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()
    ids = table.column("concept_ids").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    needle = ids[row:row + 8].tobytes()  # 8 rows of random labels: found once in the file
    data = file.read_bytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    corrupt(file, flip_at=at)


def test_writer_records_a_checksum_per_block_of_every_column(copy):
    entry = entry_of(copy)
    record = entry[block_check.KEY]
    assert set(record["columns"]) == {"token", "concept_ids", "concept_scores"}
    reader = TargetReader.open(copy)
    shard = reader.shard_views(entry)
    for name, arr in (("token", shard.tokens), ("concept_ids", shard.ids_NK), ("concept_scores", shard.scores_NK)):
        want = [block_check.crc32c(arr[a:a + record["rows_per_block"]]) for a in range(0, len(arr), record["rows_per_block"])]
        assert record["columns"][name] == want


def test_a_flipped_byte_with_unchanged_size_and_mtime_is_caught_on_read(copy):
    flip_in_ids(copy, row=3)
    reader = TargetReader.open(copy)  # the stamp vouches for the file: no sha256 at open
    entry = entry_of(copy)
    with pytest.raises(IntegrityError, match=r"shard train/shard-00001.arrow of .* rows \[0, \d+\) of column 'concept_ids' fail their CRC32C"):
        reader.window("train", entry["start"], entry["start"] + 8)


def test_small_blocks_locate_the_damage(copy, monkeypatch):
    """With blocks of 16 rows, rows of other blocks still read; the damaged block is refused."""
    monkeypatch.setattr(block_check, "BLOCK_ROWS", 16)
    from cocomix.storage.verify import add_block_checksums

    manifest = json.loads((copy / "manifest.json").read_text())
    for e in manifest["shards"]:
        e.pop(block_check.KEY)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert add_block_checksums(copy) == len(manifest["shards"])
    flip_in_ids(copy, row=40)
    reader, entry = TargetReader.open(copy), entry_of(copy)
    assert len(reader.window("train", entry["start"], entry["start"] + 32).tokens) == 32  # blocks 0 and 1: intact
    with pytest.raises(IntegrityError, match=r"rows \[32, 48\)"):
        reader.window("train", entry["start"] + 30, entry["start"] + 41)


def test_older_folder_reads_with_a_notice_and_upgrades(copy, caplog):
    manifest = json.loads((copy / "manifest.json").read_text())
    for e in manifest["shards"]:
        e.pop(block_check.KEY)
        (copy / e["path"]).with_suffix(".json").write_text(json.dumps(e))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    block_check._noticed.clear()
    with caplog.at_level(logging.WARNING, logger="cocomix"):
        reader = TargetReader.open(copy)
        reader.window("train", 0, 100)
        reader.window("val", 0, 10)
    notices = [r.getMessage() for r in caplog.records if "no block checksums" in r.getMessage()]
    assert len(notices) == 1 and f"cocomix verify {copy} --upgrade" in notices[0]
    result = run_cli("verify", copy, "--upgrade")
    assert result.exit_code == 0 and "block checksums added to" in result.output, result.output
    upgraded = entry_of(copy)
    assert upgraded[block_check.KEY] and json.loads((copy / SHARD).with_suffix(".json").read_text()) == upgraded
    flip_in_ids(copy, row=0)
    with pytest.raises(IntegrityError, match="fail their CRC32C"):
        TargetReader.open(copy).window("train", upgraded["start"], upgraded["start"] + 4)


def test_verify_names_the_damaged_shard_in_one_line(copy):
    flip_in_ids(copy, row=0)
    assert_one_line_error(run_cli("verify", copy), "shard-00001")


def test_tampered_block_record_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0][block_check.KEY]["columns"].pop("token")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="block checksums do not describe its columns"):
        TargetReader.open(copy).window("train", 0, 4)


def test_crc32c_matches_the_reference_value():
    """CRC32C check value of the ASCII digits 1..9 (RFC 3720), through our array entry point."""
    assert block_check.crc32c(np.frombuffer(b"123456789", dtype=np.uint8)) == 0xE3069283


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32])
def test_label_range_check_agrees_with_the_plain_comparison(dtype):
    """The signed-view shortcut (two reductions) refuses exactly what ``(ids >= n) & (ids != ignore)`` refuses."""
    n_latents = 300
    ignore = int(np.iinfo(dtype).max) if np.dtype(dtype).kind == "u" else -100
    validate = block_check.label_range_check("shard x", n_latents, ignore)
    rng = np.random.default_rng(0)
    for bad in [None, n_latents, n_latents + 7, int(np.iinfo(dtype).max) - 1, int(np.iinfo(dtype).max) // 2 + 1]:
        rows = rng.integers(0, n_latents, (64, 4)).astype(dtype)
        rows[::5, 2:] = ignore
        if bad is not None:
            rows[17, 1] = bad
        plain_refuses = bool(((rows >= n_latents) & (rows != ignore)).any())
        assert plain_refuses == (bad is not None)
        if plain_refuses:
            with pytest.raises(IntegrityError, match=f"holds label id {bad}, but the SAE has {n_latents} latents"):
                validate("concept_ids", rows)
        else:
            validate("concept_ids", rows)
        validate("token", rows)  # other columns are not label ids


def test_blocks_are_checked_once_per_process_even_after_the_shard_is_unmapped(copy, monkeypatch):
    """With one shard open at a time, reading shard 0, then 1, then 0 again re-maps shard 0 but hashes nothing again."""
    from cocomix.storage import target_reader

    monkeypatch.setattr(target_reader, "OPEN_SHARDS", 1)
    calls = []
    real = block_check._crc
    monkeypatch.setattr(block_check, "_crc", lambda rows: calls.append(len(rows)) or real(rows))
    reader = TargetReader.open(copy)
    first, second = reader.manifest["shards"][0], reader.manifest["shards"][1]
    reader.window("train", first["start"], first["start"] + 4, check=("token",))
    assert len(calls) == 1
    reader.window("train", second["start"], second["start"] + 4, check=("token",))
    assert len(calls) == 2 and list(reader._open) == [second["path"]]
    reader.window("train", first["start"] + 1, first["start"] + 3, check=("token",))
    assert len(calls) == 2  # re-mapped, already verified
    reader.window("train", first["start"], first["start"] + 4, check=("token", "concept_ids"))
    assert len(calls) == 3  # only the column not yet verified

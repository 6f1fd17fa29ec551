"""Damaged token-store chunk files and target shards fail loudly, naming the file."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from storage_utils import tokenize
from test_verify_inspect import targets  # noqa: F401 - the finished target folder fixture

from cocomix.core.errors import IntegrityError
from cocomix.storage.config import VerifyConfig
from cocomix.storage.targets import TargetReader
from cocomix.storage.token_store import TokenStore
from cocomix.storage.verify import run_verify

SHARD = "train/shard-00001.arrow"
STAMP = ".locks/train-shard-00001.stamp"


@pytest.fixture(scope="module", params=[0, 256], ids=["plain", "sharded"])
def small_store(request, tmp_path_factory, corpus_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("store") / "s"
    tokenize(corpus_dir, tokenizer_dir, out, chunk_tokens=64, shard_tokens=request.param)
    return out


@pytest.fixture
def store(tmp_path, small_store):
    shutil.copytree(small_store, tmp_path / "s")
    return tmp_path / "s"


def _reads(path):
    """Every way tokens are read: the direct chunk reader, the zarr fallback, ``verify``."""
    split = TokenStore.open(path).split("train")
    yield lambda: split.read(0, len(split))
    split._fast = None
    yield lambda: split.read(0, len(split))
    yield lambda: run_verify(VerifyConfig(path=str(path)))


def test_missing_chunk_file_is_an_integrity_error(store):
    (store / "train/tokens/c/2").unlink()
    for read in _reads(store):
        with pytest.raises(IntegrityError, match=r"is damaged: chunk file \S*train/tokens/c/2 is missing; re-run `cocomix tokenize`"):
            read()


def test_missing_chunk_file_inside_a_short_read(store):
    split = TokenStore.open(store).split("train")
    first = split._fast.chunk * split._fast.per_shard
    (store / "train/tokens/c/1").unlink()
    assert len(split.read(0, first)) == first
    with pytest.raises(IntegrityError, match="c/1 is missing"):
        split.read(first + 3, first + 5)


@pytest.mark.parametrize("size", [100, 3])
def test_truncated_chunk_file_is_an_integrity_error(store, size, capfd):
    os.truncate(store / "train/tokens/c/2", size)
    for read in _reads(store):
        with pytest.raises(IntegrityError, match=r"chunk file \S*train/tokens/c/2 cannot be decoded"):
            read()
    assert "Task was destroyed" not in capfd.readouterr().err


@pytest.fixture
def copy(tmp_path, targets):  # noqa: F811 - the fixture imported above
    shutil.copytree(targets, tmp_path / "t", copy_function=shutil.copy2)
    return tmp_path / "t"


def _flip(file, at):
    st = file.stat()
    data = bytearray(file.read_bytes())
    data[at] ^= 0x04
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def test_bit_flipped_shard_is_refused_by_the_reader(copy):
    _flip(copy / SHARD, (copy / SHARD).stat().st_size // 2)
    reader = TargetReader.open(copy)
    with pytest.raises(IntegrityError, match=f"shard {SHARD} fails its sha256 check .*delete it and run the extract again"):
        reader.window("train", 320, 330)
    reader.window("train", 0, 10)


def test_shard_with_wrong_size_is_refused_by_the_reader(copy):
    with open(copy / SHARD, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IntegrityError, match=f"shard {SHARD} has {(copy / SHARD).stat().st_size} bytes, its manifest says"):
        TargetReader.open(copy).window("train", 320, 330)


def test_unchanged_shard_is_trusted_from_its_stamp(copy, monkeypatch):
    from cocomix.storage import target_reader

    hashed = []
    monkeypatch.setattr(target_reader, "sha256_file", lambda f: hashed.append(f) or "0" * 64)
    TargetReader.open(copy).window("train", 320, 330)
    assert hashed == []
    (copy / STAMP).unlink()
    TargetReader.open(copy).window("val", 0, 3)
    assert hashed == []  # val shards keep their stamps
    with pytest.raises(IntegrityError, match=f"shard {SHARD} fails its sha256"):
        TargetReader.open(copy).window("train", 320, 330)
    assert [p.name for p in hashed] == ["shard-00001.arrow"]


def test_stamp_of_another_hash_does_not_vouch(copy):
    stamp = json.loads((copy / STAMP).read_text())
    _flip(copy / SHARD, (copy / SHARD).stat().st_size // 2)
    st = (copy / SHARD).stat()
    (copy / STAMP).write_text(json.dumps({**stamp, "sha256": "f" * 64, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}))
    with pytest.raises(IntegrityError, match=f"shard {SHARD} fails its sha256"):
        TargetReader.open(copy).window("train", 320, 330)


def test_cli_verify_names_the_truncated_file_without_asyncio_noise(store):
    import subprocess
    import sys

    os.truncate(store / "train/tokens/c/2", 100)
    run = subprocess.run([sys.executable, "-c", "from cocomix.pipeline.cli import app; app()", "verify", str(store)], capture_output=True, text=True)
    output = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0
    assert "train/tokens/c/2 cannot be decoded" in output and "Task was destroyed" not in output


@pytest.mark.parametrize("shard_tokens", [0, 256], ids=["plain", "sharded"])
def test_a_chunk_of_only_id_zero_is_stored_and_read(tmp_path, corpus_dir, tokenizer_dir, shard_tokens):
    """Zarr skips chunks equal to the fill value (0) unless told otherwise; with missing files now
    an error, a chunk of nothing but token 0 (here EOS: a run of empty documents) must be written."""
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "zz-zeros.txt").write_text("<|endoftext|>" * 300)
    tokenize(corpus, tokenizer_dir, tmp_path / "s", chunk_tokens=64, shard_tokens=shard_tokens, val_fraction=0.0)
    split = TokenStore.open(tmp_path / "s").split("train")
    tokens = split.read(0, len(split))
    assert (tokens == 0).sum() >= 300  # the literal special token encodes to id 0
    run_verify(VerifyConfig(path=str(tmp_path / "s")))


@pytest.mark.parametrize("text", ["[]", "3", '{"format": "other"}'])
def test_a_manifest_that_is_not_ours_is_an_integrity_error(copy, text):
    (copy / "manifest.json").write_text(text)
    with pytest.raises(IntegrityError, match="not a cocomix target manifest.*run the extract again"):
        TargetReader.open(copy)

"""verify and inspect: corrupt folders are named precisely; summaries match the data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_targets import N_LATENTS, K, make_meta, open_writer, synthetic_labels, write_all

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.storage.config import InspectConfig, VerifyConfig
from cocomix.storage.inspect import run_inspect
from cocomix.storage.targets import TargetReader, TargetWriter, id_dtype, plan_shards
from cocomix.storage.token_store import TokenStore
from cocomix.storage.verify import run_verify

SHARD = "train/shard-00001.arrow"


@pytest.fixture(scope="module")
def targets(tmp_path_factory, token_store):
    store = TokenStore.open(token_store)
    plan = plan_shards({s: len(store.split(s)) for s in store.splits}, window=64, windows_per_shard=5)
    out = tmp_path_factory.mktemp("targets") / "t"
    with open_writer(out, store, plan) as w:
        write_all(w, store)
        w.finalize()
    return out


@pytest.fixture
def copy(tmp_path, targets):
    shutil.copytree(targets, tmp_path / "t")
    return tmp_path / "t"


def test_verify_accepts_intact_folders(targets, token_store):
    result = run_verify(VerifyConfig(path=str(targets), tokens=str(token_store)))
    assert result.kind == "targets" and result.items == len(json.loads((targets / "manifest.json").read_text())["shards"])
    assert result.tokens == sum(len(TokenStore.open(token_store).split(s)) for s in ("train", "val"))
    assert run_verify(VerifyConfig(path=str(token_store))).kind == "tokens"


def test_truncated_shard(copy):
    data = (copy / SHARD).read_bytes()
    (copy / SHARD).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=f"shard {SHARD} fails its sha256"):
        run_verify(VerifyConfig(path=str(copy)))
    with pytest.raises(IntegrityError, match=f"shard {SHARD} has {len(data) // 2} bytes, its manifest says {len(data)}"):
        TargetReader.open(copy).window("train", 320, 330)


def test_bit_flipped_shard(copy):
    data = bytearray((copy / SHARD).read_bytes())
    data[len(data) // 2] ^= 0x04
    (copy / SHARD).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"shard {SHARD} fails its sha256"):
        run_verify(VerifyConfig(path=str(copy)))
    with pytest.raises(IntegrityError, match=SHARD):
        TargetReader.open(copy, verify=True)


def test_missing_shard(copy):
    (copy / SHARD).unlink()
    with pytest.raises(IntegrityError, match=f"shard {SHARD} is missing"):
        run_verify(VerifyConfig(path=str(copy)))


def test_manifest_dropping_a_shard_is_a_coverage_gap(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["path"] != SHARD]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="contiguous"):
        run_verify(VerifyConfig(path=str(copy)))


@pytest.mark.parametrize("bad_path", ["../outside.arrow", "/etc/passwd", "train/../../x.arrow"])
def test_manifest_path_leaving_its_folder(copy, bad_path):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["path"] = bad_path
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="leaves its folder"):
        TargetReader.open(copy)
    with pytest.raises(IntegrityError, match="leaves its folder"):
        run_verify(VerifyConfig(path=str(copy)))


def test_missing_manifest_is_incomplete(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="incomplete; run the extract again"):
        run_verify(VerifyConfig(path=str(copy)))


def test_token_column_differing_from_the_store(tmp_path, token_store):
    store = TokenStore.open(token_store)
    plan = plan_shards({"train": len(store.split("train"))}, window=64, windows_per_shard=5)
    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store, plan[:1])
        spec = plan[1]
        tokens = store.split("train").read(spec.start, spec.end).copy()
        tokens[7] = (tokens[7] + 1) % store.vocab_size
        w.write_shard(spec, tokens, *synthetic_labels(spec.rows, 1))
        write_all(w, store, plan[2:])
        w.finalize()
    run_verify(VerifyConfig(path=str(tmp_path / "t")))
    with pytest.raises(IntegrityError, match=f"shard {SHARD}: token column differs .* row 7"):
        run_verify(VerifyConfig(path=str(tmp_path / "t"), tokens=str(token_store)))


def test_token_store_chunk_corruption_and_wrong_lengths(tmp_path, token_store):
    store = tmp_path / "s"
    shutil.copytree(token_store, store)
    chunk = store / "train" / "tokens" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="cannot be decoded"):
        run_verify(VerifyConfig(path=str(store)))
    shutil.rmtree(store)
    shutil.copytree(token_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["counts"]["val"]["n_docs"] += 1
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="split 'val'"):
        run_verify(VerifyConfig(path=str(store)))


def test_verify_refuses_unknown_folders(tmp_path):
    with pytest.raises(CocomixError, match="neither a token store"):
        run_verify(VerifyConfig(path=str(tmp_path)))


def test_inspect_targets_json(targets, token_store, capsys):
    result = run_inspect(InspectConfig(path=str(targets), json=True, samples=3))  # decodes via the recorded store path
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(result.info, default=str))
    reader = TargetReader.open(targets)
    ids = np.concatenate([reader.window(s, 0, reader.split_length(s)).concept_ids for s in reader.splits])
    valid = ids[ids != reader.ignore_id]
    assert info["labels"]["coverage"] == pytest.approx(valid.size / ids.size)
    assert info["labels"]["distinct_concepts"] == len(np.unique(valid))
    top = np.bincount(valid.astype(np.int64)).argmax()
    assert info["labels"]["top_concepts"][0]["count"] == np.bincount(valid.astype(np.int64))[top]
    assert info["raw_bytes_per_token"] == 2 + K * (2 + 4) and info["k_attr"] == K and info["n_latents"] == N_LATENTS
    assert len(info["samples"]) == 3 and all(isinstance(s["text"], str) for s in info["samples"])
    assert info["provenance"]["sae"]["n_latents"] == N_LATENTS
    assert make_meta(TokenStore.open(token_store))["vocab_size"] == info["provenance"]["vocab_size"]


def test_inspect_token_store_tables_and_json(token_store, capsys):
    run_inspect(InspectConfig(path=str(token_store)))
    text = capsys.readouterr().out
    assert "train" in text and "val" in text and "tokenizer" in text
    info = run_inspect(InspectConfig(path=str(token_store), json=True)).info
    json.loads(capsys.readouterr().out)
    store = TokenStore.open(token_store)
    assert info["splits"]["train"]["tokens"] == len(store.split("train"))
    assert info["splits"]["val"]["documents"] == store.split("val").n_docs
    assert info["provenance"]["tokenizer_sha256"] == store.tokenizer_sha256


def test_cli_verify_exits_non_zero_naming_the_shard(copy):
    from typer.testing import CliRunner

    from cocomix.pipeline.cli import app

    (copy / SHARD).unlink()
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 2
    assert SHARD in result.output


# ---- a folder with several label sets (extract --offsets) -------------------------------------

OFFSETS = [0, 23]


@pytest.fixture
def offset_targets(tmp_path, token_store):
    """Two label sets of 64-token windows: offset 0 in <split>/, offset 23 in offset-23/<split>/."""
    store = TokenStore.open(token_store)
    plan = plan_shards({s: len(store.split(s)) for s in store.splits}, window=64, windows_per_shard=5, offsets=OFFSETS)
    meta = {**make_meta(store), "offsets": {"rule": "stratified", "seed": 0, "count": 2, "values": OFFSETS}}
    out = tmp_path / "t"
    with TargetWriter(out, meta=meta, plan=plan, k_attr=K, id_dtype=id_dtype(N_LATENTS), score_dtype="float32",
                      token_dtype=store.dtype) as w:
        write_all(w, store)
        w.finalize()
    return out


def test_every_label_set_is_verified_and_inspected(offset_targets, token_store, capsys):
    manifest = json.loads((offset_targets / "manifest.json").read_text())
    later = [e for e in manifest["shards"] if e.get("offset") == 23]
    assert later and all(e["path"].startswith("offset-23/") and e["start"] >= 23 for e in later)
    assert min(e["start"] for e in later if e["split"] == "val") == 23
    assert run_verify(VerifyConfig(path=str(offset_targets), tokens=str(token_store))).items == len(manifest["shards"])
    run_inspect(InspectConfig(path=str(offset_targets), json=True, samples=0))
    assert json.loads(capsys.readouterr().out)["window_offsets"] == {"values": "0, 23", "rule": "stratified", "seed": 0, "window": 64}
    reader = TargetReader.open(offset_targets)
    assert reader.offsets == OFFSETS
    with pytest.raises(IndexError, match="offset 23"):
        reader.window("train", 0, 64, offset=23)  # set 23 has no rows before token 23
    shard = offset_targets / later[1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"shard {later[1]['path']} fails its sha256"):
        run_verify(VerifyConfig(path=str(offset_targets)))


def test_a_shard_of_an_unlisted_offset_is_refused(offset_targets):
    manifest = json.loads((offset_targets / "manifest.json").read_text())
    manifest["meta"]["offsets"]["values"] = [0, 24]
    (offset_targets / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="belongs to no window offset"):
        run_verify(VerifyConfig(path=str(offset_targets)))

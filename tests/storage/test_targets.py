"""Target shards: plan arithmetic, round trip, zero-copy windows, claims, resume, integrity."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.storage.files import sha256_file
from cocomix.storage.targets import TargetReader, TargetWriter, id_dtype, ignore_id, plan_shards
from cocomix.storage.token_store import TokenStore

K = 4
N_LATENTS = 300


def synthetic_labels(n: int, seed: int, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, N_LATENTS, (n, K))
    ids[::5, 2:] = ignore_id(dtype)
    return ids, rng.random((n, K)).astype(np.float32)


def make_meta(store: TokenStore) -> dict:
    return {"sae": {"n_latents": N_LATENTS, "k": 8}, "tokenizer_sha256": store.tokenizer_sha256,
            "vocab_size": store.vocab_size, "k_attr": K, "window": 64, "tokens": store.provenance()}


def open_writer(out, store, plan, score_dtype="float32", **kw):
    return TargetWriter(out, meta=make_meta(store), plan=plan, k_attr=K, id_dtype=id_dtype(N_LATENTS),
                        score_dtype=score_dtype, token_dtype=store.dtype, **kw)


def write_all(writer, store, specs=None):
    """Fill shards with the store's tokens and seeded labels; return the reference columns per split."""
    for spec in specs if specs is not None else writer.pending():
        assert writer.claim(spec)
        ids, scores = synthetic_labels(spec.rows, spec.index + 100 * (spec.split == "val"))
        writer.write_shard(spec, store.split(spec.split).read(spec.start, spec.end), ids, scores)


def reference(store, plan, score_dtype="float32"):
    ref = {}
    for spec in plan:
        ids, scores = synthetic_labels(spec.rows, spec.index + 100 * (spec.split == "val"))
        tok = store.split(spec.split).read(spec.start, spec.end)
        parts = ref.setdefault(spec.split, ([], [], []))
        parts[0].append(tok), parts[1].append(ids.astype(np.uint16)), parts[2].append(scores.astype(score_dtype))
    return {s: tuple(np.concatenate(p) for p in parts) for s, parts in ref.items()}


@pytest.fixture
def store(token_store):
    return TokenStore.open(token_store)


@pytest.fixture
def plan(store):
    return plan_shards({s: len(store.split(s)) for s in store.splits}, window=64, windows_per_shard=5)


@pytest.fixture
def finished(tmp_path, store, plan):
    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store)
        w.finalize({"note": "test"})
    return tmp_path / "t"


def test_plan_shards_arithmetic():
    plan = plan_shards({"train": 1000, "val": 64, "empty": 0}, window=64, windows_per_shard=4)
    train = [s for s in plan if s.split == "train"]
    assert [(s.start, s.end) for s in train] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert [s.index for s in train] == [0, 1, 2, 3] and train[1].relpath == "train/shard-00001.arrow"
    assert [(s.split, s.start, s.end) for s in plan if s.split != "train"] == [("val", 0, 64)]
    with pytest.raises(CocomixError):
        plan_shards({"train": 10}, window=0, windows_per_shard=1)


def test_id_dtype_reserves_the_ignore_id():
    assert id_dtype(32768) == np.uint16 and id_dtype(65534) == np.uint16
    assert id_dtype(65535) == np.uint32
    assert ignore_id(np.uint16) == 65535 and ignore_id(np.uint32) == 2**32 - 1


@pytest.mark.parametrize("score_dtype", ["float32", "float16"])
def test_round_trip_and_windows_across_shards(tmp_path, store, plan, score_dtype):
    with open_writer(tmp_path / "t", store, plan, score_dtype) as w:
        write_all(w, store)
        w.finalize()
    reader = TargetReader.open(tmp_path / "t", verify=True)
    ref = reference(store, plan, score_dtype)
    assert reader.k_attr == K and reader.n_latents == N_LATENTS and reader.ignore_id == 65535
    rng = np.random.default_rng(0)
    for split in reader.splits:
        n = reader.split_length(split)
        assert n == len(store.split(split))
        for start in [0, 319, 320, 321, n - 1] + list(rng.integers(0, n, 10)):
            stop = min(start + int(rng.integers(1, 900)), n)
            win = reader.window(split, int(start), stop)
            np.testing.assert_array_equal(win.tokens, ref[split][0][start:stop])
            np.testing.assert_array_equal(win.concept_ids, ref[split][1][start:stop])
            np.testing.assert_array_equal(win.concept_scores, ref[split][2][start:stop])
            assert win.concept_ids.shape == (stop - start, K)


def test_windows_inside_a_shard_are_zero_copy(finished):
    reader = TargetReader.open(finished)
    win = reader.window("train", 10, 200)
    shard = reader.shard_views(reader.manifest["shards"][0])
    assert np.shares_memory(win.concept_ids, shard.ids_NK) and np.shares_memory(win.tokens, shard.tokens)
    assert not win.concept_ids.flags.owndata and not win.concept_ids.flags.writeable


def test_plain_pyarrow_shows_exactly_the_three_columns(finished):
    table = pa.ipc.open_file(finished / "train" / "shard-00000.arrow").read_all()
    assert table.column_names == ["token", "concept_ids", "concept_scores"]
    assert table.schema.field("concept_ids").type == pa.list_(pa.field("item", pa.uint16(), nullable=False), K)
    assert table.schema.field("concept_scores").type.value_type == pa.float32()
    assert table.num_rows == 320


def test_shard_bytes_are_deterministic(tmp_path, store, plan, finished):
    with open_writer(tmp_path / "again", store, plan) as w:
        write_all(w, store)
        w.finalize({"note": "test"})
    for spec in plan:
        assert sha256_file(tmp_path / "again" / spec.relpath) == sha256_file(finished / spec.relpath)
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (finished / "manifest.json").read_bytes()


def test_no_manifest_is_incomplete_and_finalize_needs_every_shard(tmp_path, store, plan):
    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store, plan[:2])
        with pytest.raises(IntegrityError, match="not done"):
            w.finalize()
    with pytest.raises(IntegrityError, match="run the extract again"):
        TargetReader.open(tmp_path / "t")
    (tmp_path / "t" / "train" / ".shard-00003.arrow.999999.tmp").write_bytes(b"half a shard from a killed writer")
    with open_writer(tmp_path / "t", store, plan) as w:
        assert w.pending() == plan[2:]
        write_all(w, store)
        w.finalize()
    TargetReader.open(tmp_path / "t", verify=True)
    assert not list((tmp_path / "t").glob("*/.*.tmp"))


def test_pending_partitions_by_rank(tmp_path, store, plan):
    with open_writer(tmp_path / "t", store, plan) as w:
        parts = [w.pending(rank, 3) for rank in range(3)]
    assert sorted((s for p in parts for s in p), key=plan.index) == plan
    assert parts[1] == plan[1::3]


def test_claim_is_exclusive_and_done_shards_are_not_claimed(tmp_path, store, plan):
    a = open_writer(tmp_path / "t", store, plan)
    b = open_writer(tmp_path / "t", store, plan)
    assert a.claim(plan[0]) and not b.claim(plan[0])
    with pytest.raises(CocomixError, match="held by another process"):
        b.write_shard(plan[0], np.zeros(plan[0].rows), *synthetic_labels(plan[0].rows, 0))
    write_all(a, store, [plan[0]])
    assert a.is_done(plan[0]) and not b.claim(plan[0])
    a.__exit__(None, None, None), b.__exit__(None, None, None)


def test_killed_claimant_releases_its_lock(tmp_path, store, plan):
    code = (
        "import sys, os, signal; from cocomix.storage.target_writer import TargetWriter\n"
        "from cocomix.storage.targets import ShardSpec\n"
        "import json; rec = json.load(open(sys.argv[1] + '/plan.json'))\n"
        "w = TargetWriter(sys.argv[1], meta=rec['meta'], plan=[ShardSpec(**s) for s in rec['shards']], k_attr=rec['k_attr'],"
        " id_dtype=rec['dtypes']['id'], score_dtype=rec['dtypes']['score'], token_dtype=rec['dtypes']['token'])\n"
        "assert w.claim(w.plan[0]); print('claimed', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    w = open_writer(tmp_path / "t", store, plan)
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
    assert "claimed" in child.stdout and child.returncode == -9, child.stderr
    assert w.claim(plan[0])
    w.__exit__(None, None, None)


def test_other_settings_refused_unless_overwrite(tmp_path, store, plan, finished):
    with pytest.raises(MismatchError, match="k_attr|dtypes|meta"):
        open_writer(finished, store, plan, score_dtype="float16")
    other = plan_shards({"train": len(store.split("train"))}, 64, 2)
    with pytest.raises(MismatchError):
        open_writer(finished, store, other)
    with open_writer(finished, store, other, overwrite=True) as w:
        assert not (finished / "manifest.json").exists() and w.pending() == other


def test_bad_shapes_and_values_refused(tmp_path, store, plan):
    spec = plan[0]
    tok = store.split("train").read(spec.start, spec.end)
    ids, scores = synthetic_labels(spec.rows, 0)
    with open_writer(tmp_path / "t", store, plan) as w:
        with pytest.raises(CocomixError, match="shape"):
            w.write_shard(spec, tok[:-1], ids, scores)
        with pytest.raises(CocomixError, match="not a latent"):
            w.write_shard(spec, tok, np.full_like(ids, N_LATENTS), scores)
        with pytest.raises(CocomixError, match="do not fit uint16"):
            w.write_shard(spec, tok.astype(np.int64) + 70000, ids, scores)
        assert not w.is_done(spec) and w.claim(spec)


def test_check_tokens_names_the_mismatch(finished, store):
    reader = TargetReader.open(finished)
    reader.check_tokens(store.provenance())
    moved = store.provenance()
    moved["path"] = "/somewhere/else"
    reader.check_tokens(moved)
    other = store.provenance()
    other["tokenizer_sha256"] = "0" * 64
    with pytest.raises(MismatchError, match="tokenizer sha256"):
        reader.check_tokens(other)
    other = store.provenance()
    other["counts"]["train"]["n_tokens"] += 1
    with pytest.raises(MismatchError, match="train tokens"):
        reader.check_tokens(other)


def test_manifest_records_provenance_and_shards(finished, plan):
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["ignore_id"] == 65535 and manifest["k_attr"] == K
    assert manifest["dtypes"] == {"token": "uint16", "id": "uint16", "score": "float32"}
    assert [s["path"] for s in manifest["shards"]] == [p.relpath for p in plan]
    assert all(len(s["sha256"]) == 64 and s["rows"] == s["end"] - s["start"] for s in manifest["shards"])
    assert manifest["meta"]["sae"]["n_latents"] == N_LATENTS and manifest["extra"] == {"note": "test"}


KILL_MID_SHARD = r"""
import json, os, signal, sys
import numpy as np
from cocomix.storage import target_writer
from cocomix.storage.targets import ShardSpec, TargetWriter

rec = json.load(open(sys.argv[1] + "/plan.json"))
w = TargetWriter(sys.argv[1], meta=rec["meta"], plan=[ShardSpec(**s) for s in rec["shards"]], k_attr=rec["k_attr"],
                 id_dtype=rec["dtypes"]["id"], score_dtype=rec["dtypes"]["score"], token_dtype=rec["dtypes"]["token"])
sidecar = target_writer.atomic_write_json
def dying(path, obj):
    if str(path).endswith("shard-00001.json"):  # the second shard is renamed into place, its sidecar never written
        os.kill(os.getpid(), signal.SIGKILL)
    sidecar(path, obj)
target_writer.atomic_write_json = dying
for spec in w.pending():
    n = spec.rows
    w.write_shard(spec, np.zeros(n, np.uint16), np.zeros((n, rec["k_attr"]), np.uint16), np.zeros((n, rec["k_attr"])))
"""


def test_writer_killed_mid_shard_leaves_nothing_accepted(tmp_path, store, plan):
    out = tmp_path / "t"
    open_writer(out, store, plan).__exit__(None, None, None)
    child = subprocess.run([sys.executable, "-c", KILL_MID_SHARD, str(out)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    assert (out / plan[1].relpath).exists() and not (out / plan[1].relpath).with_suffix(".json").exists()
    with pytest.raises(IntegrityError, match="incomplete"):
        TargetReader.open(out)
    with open_writer(out, store, plan) as w:
        assert w.is_done(plan[0]) and not w.is_done(plan[1])
        assert w.pending() == plan[1:]
        write_all(w, store)
        w.finalize()
    TargetReader.open(out, verify=True)


def count_hashes(monkeypatch) -> list:
    """Record every sha256 the writer computes (the real function still runs)."""
    from cocomix.storage import target_writer

    calls = []
    real = target_writer.sha256_file
    monkeypatch.setattr(target_writer, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


def test_restart_does_not_rehash_unchanged_shards(tmp_path, store, plan, monkeypatch):
    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store, plan[:3])
    calls = count_hashes(monkeypatch)
    with open_writer(tmp_path / "t", store, plan) as w:  # a restarted extract
        assert w.pending() == plan[3:]
        write_all(w, store)
        w.finalize()
    assert len(calls) == len(plan) - 3  # only the new shards, each once as it is written
    TargetReader.open(tmp_path / "t", verify=True)


def test_a_shard_without_stamp_is_hashed_once_then_trusted(tmp_path, store, plan, monkeypatch):
    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store, plan[:2])
    for stamp in (tmp_path / "t" / ".locks").glob("*.stamp"):
        stamp.unlink()  # as a folder copied without its hidden files
    calls = count_hashes(monkeypatch)
    with open_writer(tmp_path / "t", store, plan) as w:
        assert w.pending() == plan[2:] and len(calls) == 2
        assert w.pending() == plan[2:] and len(calls) == 2


def test_a_shard_changed_after_its_stamp_is_hashed_and_redone(tmp_path, store, plan, monkeypatch):
    import os

    with open_writer(tmp_path / "t", store, plan) as w:
        write_all(w, store, plan[:2])
    shard = tmp_path / "t" / plan[1].relpath
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    st = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls = count_hashes(monkeypatch)
    with open_writer(tmp_path / "t", store, plan) as w:
        assert w.pending() == plan[1:] and calls == [shard]

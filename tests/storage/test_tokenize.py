"""tokenize + token store: contents equal a plain per-document reference, for every source kind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from storage_utils import read_store, reference_store, tokenize

from cocomix.core.errors import CocomixError
from cocomix.storage.token_store import SCHEMA_VERSION, TokenStore, token_dtype, tokenizer_fingerprint
from cocomix.storage.tokenize import val_mask


def assert_store_equals(store: dict, ref: dict) -> None:
    for split in ("train", "val"):
        np.testing.assert_array_equal(store[split][0], ref[split][0], err_msg=f"{split} tokens")
        np.testing.assert_array_equal(store[split][1], ref[split][1], err_msg=f"{split} doc_offsets")


def test_fixture_store_matches_reference(token_store, docs, tokenizer_dir):
    assert_store_equals(read_store(token_store), reference_store(docs, tokenizer_dir, 0.1))


def test_store_attributes_and_provenance(token_store, tokenizer_dir, corpus_dir):
    from transformers import AutoTokenizer

    store = TokenStore.open(token_store)
    assert store.splits == ["train", "val"]
    assert store.dtype == np.uint16 and store.vocab_size == 384
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert store.eos_id == tok.eos_token_id
    assert store.tokenizer_sha256 == tokenizer_fingerprint(tok) == tokenizer_fingerprint(store.load_tokenizer())
    prov = store.provenance()
    json.dumps(prov)
    assert prov["schema_version"] == SCHEMA_VERSION and prov["split"]["val_fraction"] == 0.1
    assert prov["corpus"]["source"] == str(corpus_dir) and len(prov["corpus"]["fingerprint"]) == 64
    counts = prov["counts"]
    assert counts["train"]["n_docs"] + counts["val"]["n_docs"] == 60
    assert counts["train"]["n_tokens"] == len(store.split("train"))


def test_split_reads_and_doc_boundaries(token_store):
    store = TokenStore.open(token_store)
    split = store.split("train")
    whole = split.read(0, len(split))
    np.testing.assert_array_equal(split.read(100, 700), whole[100:700])
    assert len(split.read(len(split) - 5, len(split) + 100)) == 5
    offsets = split.doc_offsets()
    assert offsets.dtype == np.int64 and len(offsets) == split.n_docs + 1
    assert (whole[offsets[1:] - 1] == store.eos_id).all()
    assert (whole == store.eos_id).sum() == split.n_docs
    with pytest.raises(CocomixError, match="known splits: train, val"):
        store.split("test")


def test_split_rule_is_deterministic_and_near_fraction():
    idx = np.arange(200_000)
    mask = val_mask(idx, 0.01, seed=3)
    np.testing.assert_array_equal(mask, val_mask(idx, 0.01, seed=3))
    assert 0.009 < mask.mean() < 0.011
    assert not np.array_equal(mask, val_mask(idx, 0.01, seed=4))
    np.testing.assert_array_equal(mask[1000:2000], val_mask(idx[1000:2000], 0.01, seed=3))


@pytest.mark.parametrize("chunk_tokens,shard_tokens", [(7, 0), (64, 0), (16, 128)])
def test_tiny_chunks_and_batches_match_reference(tmp_path, corpus_dir, tokenizer_dir, docs, chunk_tokens, shard_tokens):
    tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", chunk_tokens=chunk_tokens, shard_tokens=shard_tokens, batch_size=3, val_fraction=0.3)
    assert_store_equals(read_store(tmp_path / "s"), reference_store(docs, tokenizer_dir, 0.3))


@pytest.mark.parametrize("shard_tokens", [0, 256])
def test_fast_chunk_reads_equal_zarr(tmp_path, corpus_dir, tokenizer_dir, shard_tokens):
    tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", chunk_tokens=32, shard_tokens=shard_tokens)
    split = TokenStore.open(tmp_path / "s").split("train")
    assert split._fast is not None, "the store layout must take the fast path"
    rng = np.random.default_rng(0)
    for start in [0, 31, 32, 255, 256, len(split) - 3] + list(rng.integers(0, len(split), 30)):
        stop = int(start + rng.integers(0, 600))
        np.testing.assert_array_equal(split.read(int(start), stop), split.tokens_array[int(start):min(stop, len(split))])


def test_jsonl_json_parquet_sources_match_txt(tmp_path, jsonl_file, docs, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.json").write_text(json.dumps([{"body": d} for d in docs]))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    ref = reference_store(docs, tokenizer_dir, 0.1)
    tokenize(jsonl_file, tokenizer_dir, tmp_path / "a")
    tokenize(tmp_path / "c.json", tokenizer_dir, tmp_path / "b", text_field="body")
    tokenize(tmp_path / "c.parquet", tokenizer_dir, tmp_path / "c")
    for out in "abc":
        assert_store_equals(read_store(tmp_path / out), ref)


def test_num_proc_matches_single_process(tmp_path, corpus_dir, tokenizer_dir, docs):
    tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", num_proc=2, batch_size=7)
    assert_store_equals(read_store(tmp_path / "s"), reference_store(docs, tokenizer_dir, 0.1))


def test_train_tokenizer_saved_into_store(tmp_path, corpus_dir, docs):
    result = tokenize(corpus_dir, None, tmp_path / "s", train_tokenizer=300)
    store = TokenStore.open(tmp_path / "s")
    tok = store.load_tokenizer()
    assert tok.eos_token == "<|endoftext|>" and store.eos_id == tok.eos_token_id
    assert result.vocab_size == len(tok) <= 300
    assert_store_equals(read_store(tmp_path / "s"), reference_store(docs, tmp_path / "s" / "tokenizer", 0.1))


def test_max_docs_and_rerun_is_noop(tmp_path, corpus_dir, tokenizer_dir):
    first = tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", max_docs=25)
    assert sum(c["n_docs"] for c in first.counts.values()) == 25
    mtime = (tmp_path / "s" / "zarr.json").stat().st_mtime_ns
    again = tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", max_docs=25)
    assert again.already_complete and again.counts == first.counts
    assert (tmp_path / "s" / "zarr.json").stat().st_mtime_ns == mtime


def test_token_dtype_by_vocab():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_buffers_stay_below_one_file_block(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    from cocomix.storage.store_writer import StoreWriter

    seen = []
    flush = StoreWriter.flush

    def recording(self, final=False):
        flush(self, final)
        seen.extend(buf.n_buffered for buf in self.buffers.values())

    monkeypatch.setattr(StoreWriter, "flush", recording)
    tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", chunk_tokens=16, shard_tokens=64, batch_size=5)
    assert seen and max(seen) < 64, "memory must be bounded by one shard, whatever the corpus size"


def test_no_val_split(tmp_path, corpus_dir, tokenizer_dir):
    from cocomix.storage.verify import verify_token_store

    tokenize(corpus_dir, tokenizer_dir, tmp_path / "s", val_fraction=0.0)
    store = TokenStore.open(tmp_path / "s")
    assert store.split("val").n_docs == 0 and len(store.split("val")) == 0
    assert store.split("train").n_docs == 60
    np.testing.assert_array_equal(store.split("val").doc_offsets(), [0])
    verify_token_store(tmp_path / "s")

"""Resume identity: content fingerprints decide, never how a path was spelled.

- ``tokenize`` continues (or finds complete) a store when the corpus or tokenizer is given as
  ``corpus/``, an absolute path or a relative one, and still refuses another tokenizer.
- A target folder resumes when the teacher, SAE or token store moved but kept its sha256 /
  fingerprint; another hub teacher id or revision (no local sha256) is refused.
- The refusal names the differing leaf keys with both values.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from storage_utils import read_store, tokenize

from cocomix.core.errors import MismatchError
from cocomix.storage.store_writer import StoreWriter
from cocomix.storage.targets import TargetWriter, id_dtype, plan_shards
from cocomix.storage.token_store import TokenStore

SETTINGS = dict(val_fraction=0.2, chunk_tokens=64, batch_size=4)


def _respelled(path) -> list[str]:
    """The same folder as ``dir/`` and as a path relative to the working directory."""
    return [str(path) + "/", os.path.relpath(path)]


@pytest.mark.parametrize("spelling", [0, 1])
def test_complete_store_is_a_no_op_under_another_corpus_spelling(tmp_path, corpus_dir, tokenizer_dir, spelling):
    out = tmp_path / "s"
    tokenize(corpus_dir, tokenizer_dir, out, **SETTINGS)
    result = tokenize(_respelled(corpus_dir)[spelling], _respelled(tokenizer_dir)[spelling], out, **SETTINGS)
    assert result.already_complete


def test_interrupted_store_resumes_under_another_corpus_spelling(tmp_path, monkeypatch, corpus_dir, tokenizer_dir):
    ref = tmp_path / "ref"
    tokenize(corpus_dir, tokenizer_dir, ref, **SETTINGS)

    def die_before_complete(self, extra):
        self.commit()
        raise KeyboardInterrupt

    out = tmp_path / "s"
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "finish", die_before_complete)
        with pytest.raises(KeyboardInterrupt):
            tokenize(corpus_dir, tokenizer_dir, out, **SETTINGS)
    result = tokenize(str(corpus_dir) + "/", str(tokenizer_dir) + "/", out, **SETTINGS)
    assert not result.already_complete and result.resumed_after_docs > 0
    got, want = read_store(out), read_store(ref)
    assert got.keys() == want.keys()
    for split in want:
        assert all(np.array_equal(a, b) for a, b in zip(got[split], want[split]))
    assert TokenStore.open(out).attrs["corpus"]["source"] == str(corpus_dir)  # recorded, as first given


def test_other_tokenizer_content_is_still_refused(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "s"
    tokenize(corpus_dir, tokenizer_dir, out, **SETTINGS)
    with pytest.raises(MismatchError, match="--overwrite"):
        tokenize(str(corpus_dir) + "/", None, out, train_tokenizer=300, **SETTINGS)


# ---- target folders ------------------------------------------------------------------------

K = 4


@pytest.fixture
def store(token_store):
    return TokenStore.open(token_store)


def _meta(store, **parts) -> dict:
    meta = {
        "teacher": {"id": "/data/teacher", "sha256": "a" * 64, "n_layer": 3, "d_model": 32},
        "sae": {"source": "sae.pt", "format": "openai", "sha256": "b" * 64, "n_latents": 256, "k": 8, "d_in": 32,
                "normalize": True, "layer": 1, "location": "resid_post"},
        "tokenizer_sha256": store.tokenizer_sha256, "vocab_size": store.vocab_size, "k_attr": K, "window": 64,
        "tokens": store.provenance(),
    }
    for key, value in parts.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    return meta


def _writer(out, store, meta, windows_per_shard=5):
    plan = plan_shards({s: len(store.split(s)) for s in store.splits}, window=64, windows_per_shard=windows_per_shard)
    return TargetWriter(out, meta=meta, plan=plan, k_attr=K, id_dtype=id_dtype(256), score_dtype="float32",
                        token_dtype=store.dtype)


def _started(out, store, meta) -> None:
    """A folder with one finished shard (a plan that finished none is replaced by a retry with other settings)."""
    with _writer(out, store, meta) as w:
        spec = w.plan[0]
        w.write_shard(spec, store.split(spec.split).read(spec.start, spec.end), np.zeros((spec.rows, K), np.uint16),
                      np.zeros((spec.rows, K), np.float32))


def test_target_folder_resumes_after_inputs_moved(tmp_path, store):
    out = tmp_path / "t"
    _writer(out, store, _meta(store)).__exit__()
    plan_before = (out / "plan.json").read_bytes()
    tokens = copy.deepcopy(store.provenance())
    tokens["path"] = "/elsewhere/tokens"
    moved = _meta(store, teacher={"id": "/copied/teacher"}, sae={"source": "/abs/path/sae.pt"}, tokens=tokens)
    _writer(out, store, moved).__exit__()  # no MismatchError
    assert (out / "plan.json").read_bytes() == plan_before


@pytest.mark.parametrize("teacher,what", [
    ({"id": "gpt2-medium", "revision": "r1"}, "meta.teacher.id was gpt2, now gpt2-medium"),
    ({"id": "gpt2", "revision": "r2"}, "meta.teacher.revision was r1, now r2"),
])
def test_other_hub_teacher_is_refused(tmp_path, store, teacher, what):
    hub = {"id": "gpt2", "revision": "r1", "n_layer": 3, "d_model": 32}
    out = tmp_path / "t"
    _started(out, store, {**_meta(store), "teacher": hub})
    with pytest.raises(MismatchError) as err:
        _writer(out, store, {**_meta(store), "teacher": {**hub, **teacher}})
    assert what in str(err.value)


def test_other_sae_or_store_content_is_refused(tmp_path, store):
    out = tmp_path / "t"
    _started(out, store, _meta(store))
    with pytest.raises(MismatchError, match="meta.sae.sha256"):
        _writer(out, store, _meta(store, sae={"sha256": "c" * 64}))
    tokens = copy.deepcopy(store.provenance())
    tokens["corpus"]["fingerprint"] = "0" * 64
    with pytest.raises(MismatchError, match="meta.tokens.corpus.fingerprint"):
        _writer(out, store, _meta(store, tokens=tokens))


def test_refusal_names_the_differing_leaf_keys(tmp_path, store):
    out = tmp_path / "t"
    _started(out, store, _meta(store))
    with pytest.raises(MismatchError) as err:
        _writer(out, store, _meta(store, sae={"k": 16}))
    message = str(err.value)
    assert "meta.sae.k was 8, now 16" in message and "d_in" not in message and "…" not in message
    with pytest.raises(MismatchError) as err:
        _writer(out, store, _meta(store), windows_per_shard=3)
    assert "windows per shard was 5, now 3" in str(err.value) and "'start'" not in str(err.value)


def test_a_plan_that_finished_no_shard_is_replaced_by_other_settings(tmp_path, store):
    out = tmp_path / "t"
    _writer(out, store, _meta(store)).__exit__()
    _writer(out, store, _meta(store, sae={"k": 16})).__exit__()  # no MismatchError: nothing would be lost
    assert json.loads((out / "plan.json").read_text())["meta"]["sae"]["k"] == 16

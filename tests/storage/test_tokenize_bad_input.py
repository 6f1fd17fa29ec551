"""Every bad input of issue 2 for `tokenize`: one clear error (or a counted, reported repair)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from storage_utils import read_store, tokenize

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.storage.token_store import TokenStore, token_dtype


def test_missing_path(tmp_path, tokenizer_dir):
    with pytest.raises(CocomixError, match="does not exist"):
        tokenize(tmp_path / "nope", tokenizer_dir, tmp_path / "s")
    with pytest.raises(CocomixError, match="does not exist"):
        tokenize("./missing-corpus.jsonl", tokenizer_dir, tmp_path / "s")


def test_empty_folder_and_empty_file(tmp_path, tokenizer_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CocomixError, match="empty"):
        tokenize(tmp_path / "empty", tokenizer_dir, tmp_path / "s")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(CocomixError, match="no documents"):
        tokenize(tmp_path / "e.jsonl", tokenizer_dir, tmp_path / "s2")
    assert not (tmp_path / "s2").exists(), "an empty corpus must not leave a store behind"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_records_without_text_field_name_field_and_found(tmp_path, tokenizer_dir, suffix):
    records = [{"body": "hello", "id": 1}]
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(records[0]) + "\n" if suffix == ".jsonl" else json.dumps(records))
    with pytest.raises(CocomixError) as err:
        tokenize(path, tokenizer_dir, tmp_path / "s")
    assert "'text'" in str(err.value) and "body" in str(err.value) and "id" in str(err.value) and "--text-field" in str(err.value)


def test_non_utf8_bytes_replaced_counted_reported(tmp_path, tokenizer_dir, caplog):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"good text \xff\xfe and \xc3 more")
    (corpus / "b.txt").write_bytes("clean caf\u00e9".encode())
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n{"text": "fine"}\n')
    with caplog.at_level(logging.WARNING, logger="cocomix"):
        result = tokenize(corpus, tokenizer_dir, tmp_path / "s")
    assert result.replaced_bytes == 3
    assert "3 bytes that are not UTF-8" in caplog.text
    assert TokenStore.open(tmp_path / "s").attrs["replaced_bytes"] == 3
    tok = TokenStore.open(tmp_path / "s").load_tokenizer()
    texts = [tok.decode(t[o[0]:o[-1]]) for t, o in read_store(tmp_path / "s").values()]
    assert any("\ufffd" in t for t in texts)
    assert tokenize(tmp_path / "c.jsonl", tokenizer_dir, tmp_path / "s2").replaced_bytes == 1


def test_tokenizer_without_eos(tmp_path, tokenizer_dir, corpus_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CocomixError, match="no EOS token"):
        tokenize(corpus_dir, tmp_path / "tok", tmp_path / "s")


def test_vocabulary_that_does_not_fit_the_dtype():
    with pytest.raises(CocomixError, match="does not fit"):
        token_dtype(2**32 + 1)


def test_encoder_refuses_ids_beyond_the_dtype(tokenizer_dir):
    from transformers import AutoTokenizer

    from cocomix.storage.encode import Encoder

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    enc = Encoder(tok.backend_tokenizer.to_str(), eos_id=70000, dtype="uint16")
    with pytest.raises(CocomixError, match="does not fit uint16"):
        enc(["hello"])


def test_output_holding_other_corpus_or_tokenizer_refused_unless_overwrite(tmp_path, corpus_dir, tokenizer_dir, jsonl_file):
    out = tmp_path / "s"
    tokenize(corpus_dir, tokenizer_dir, out)
    with pytest.raises(MismatchError, match="--overwrite") as err:
        tokenize(jsonl_file, tokenizer_dir, out)
    assert str(corpus_dir) in str(err.value) and str(jsonl_file) in str(err.value)
    with pytest.raises(MismatchError, match=r"tokenizer.train_bpe was \(absent\), now 300"):
        tokenize(corpus_dir, None, out, train_tokenizer=300)
    with pytest.raises(MismatchError):
        tokenize(corpus_dir, tokenizer_dir, out, seed=1)
    result = tokenize(jsonl_file, tokenizer_dir, out, overwrite=True)
    assert not result.already_complete
    assert TokenStore.open(out).attrs["corpus"]["source"] == str(jsonl_file)


def test_output_folder_that_is_not_a_store_is_never_deleted(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(CocomixError, match="not a token store"):
        tokenize(corpus_dir, tokenizer_dir, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep"


def test_reader_refuses_non_stores_and_other_versions(tmp_path, token_store):
    with pytest.raises(CocomixError, match="does not exist"):
        TokenStore.open(tmp_path / "none")
    (tmp_path / "x").mkdir()
    with pytest.raises(IntegrityError, match="not a token store"):
        TokenStore.open(tmp_path / "x")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(token_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 999
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="schema_version 999"):
        TokenStore.open(copy)
    meta["attributes"]["schema_version"] = 1
    meta["attributes"]["complete"] = False
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="incomplete"):
        TokenStore.open(copy)
    assert np.asarray(read_store(token_store)["train"][0]).size


def test_hub_names_and_alias_offline(tmp_path, tokenizer_dir):
    from cocomix.storage.corpus import resolve_corpus

    assert resolve_corpus("openwebtext").hub_name == "Skylion007/openwebtext"
    with pytest.raises(CocomixError, match="pass a local .* to --corpus"):
        tokenize("no-such-org/no-such-dataset", tokenizer_dir, tmp_path / "s")
    assert not (tmp_path / "s").exists(), "an unreachable source must fail before the output folder is made"


def test_missing_field_fails_before_creating_the_store(tmp_path, tokenizer_dir):
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CocomixError, match="'text'"):
        tokenize(tmp_path / "c.jsonl", tokenizer_dir, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kw,flag", [
    ({"val_fraction": 1.0}, "--val-fraction"), ({"num_proc": 0}, "--num-proc"), ({"chunk_tokens": 0}, "--chunk-tokens"),
    ({"chunk_tokens": 100, "shard_tokens": 250}, "--shard-tokens"), ({"train_tokenizer": 100}, "--train-tokenizer"),
    ({"train_tokenizer": 300, "tokenizer": "x"}, "--tokenizer"), ({"batch_size": 0}, "--batch-size"),
    ({"max_docs": 0}, "--max-docs"), ({"max_docs": -5}, "--max-docs"),
])
def test_config_errors_name_the_flag(kw, flag):
    from cocomix.core.errors import ConfigError
    from cocomix.storage.config import TokenizeConfig

    with pytest.raises(ConfigError, match=flag):
        TokenizeConfig(corpus="c", **kw)


def test_a_name_that_is_no_local_path_says_it_goes_to_the_hub(monkeypatch, caplog):
    """A typo'd folder name is a hub dataset name to us; say so before the hub client's retries."""
    from cocomix.storage.corpus import resolve_corpus

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with caplog.at_level("INFO", logger="cocomix"):
        corpus = resolve_corpus("my_corpus_typo")
    assert corpus.kind == "hub" and "no local path" in caplog.text and "'my_corpus_typo'" in caplog.text


def test_a_tokenizer_that_is_no_local_path_says_it_goes_to_the_hub(monkeypatch, caplog):
    from cocomix.core.errors import CocomixError
    from cocomix.storage.bpe import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("INFO", logger="cocomix"), pytest.raises(CocomixError, match="hub id"):
        load_tokenizer("my_tokenizer_typo")
    assert "no local path" in caplog.text

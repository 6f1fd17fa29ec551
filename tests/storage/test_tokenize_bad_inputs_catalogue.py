"""Stage 0 (tokenize, verify, inspect) bad inputs through the real CLI: one ``error:`` line each,
no traceback, and no token store left behind (a corrected retry just works)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from catalogue import assert_one_line_error, run_cli


def tokenize(corpus, tokenizer, out, *extra):
    return run_cli("tokenize", "--corpus", corpus, "--tokenizer", tokenizer, "--out", out, *extra)


def jsonl(folder: Path, records: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.parametrize("value, kind", [(["a", "list"], "list"), ({"a": "dict"}, "dict"), (42, "int"), (1.5, "float"), (True, "bool")])
def test_jsonl_text_field_that_is_not_text_names_file_and_line(value, kind, tmp_path, tokenizer_dir):
    corpus = jsonl(tmp_path / "c", [{"text": "fine words here"}, {"text": value}])
    out = tmp_path / "tokens"
    assert_one_line_error(tokenize(corpus, tokenizer_dir, out), "docs.jsonl:2", f"holds a {kind}, not text")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("texts", [["", "", ""], [None, None]], ids=["empty strings", "nulls"])
def test_corpus_whose_documents_are_all_empty(texts, tmp_path, tokenizer_dir):
    corpus = jsonl(tmp_path / "c", [{"text": t} for t in texts])
    out = tmp_path / "tokens"
    assert_one_line_error(tokenize(corpus, tokenizer_dir, out), "are empty")
    assert not out.exists() or not any(out.iterdir())
    jsonl(corpus, [{"text": "now there is text"}])  # corrected: the retry needs no --overwrite
    result = tokenize(corpus, tokenizer_dir, out)
    assert result.exit_code == 0, result.output


def test_empty_txt_files_are_an_empty_corpus(tmp_path, tokenizer_dir):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("")
    assert_one_line_error(tokenize(corpus, tokenizer_dir, tmp_path / "tokens"), "are empty")


def test_tokenizer_folder_naming_custom_code_is_refused(tmp_path, corpus_dir, tokenizer_dir):
    tok = Path(shutil.copytree(tokenizer_dir, tmp_path / "tok"))
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.Tok", None]}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert_one_line_error(tokenize(corpus_dir, tok, tmp_path / "tokens"), "auto_map", str(tok))
    assert not (tmp_path / "tokens").exists()


def test_non_finite_float_flag_is_refused(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "tokens"
    assert_one_line_error(tokenize(corpus_dir, tokenizer_dir, out, "--val-fraction", "nan"), "--val-fraction")
    assert not out.exists()


def test_store_missing_an_array_zarr_json_is_one_line_for_verify_and_inspect(tmp_path, token_store):
    store = Path(shutil.copytree(token_store, tmp_path / "tokens"))
    (store / "train" / "doc_offsets" / "zarr.json").unlink()
    for result in (run_cli("verify", store), run_cli("inspect", store)):
        assert_one_line_error(result, "train/doc_offsets/zarr.json is missing")

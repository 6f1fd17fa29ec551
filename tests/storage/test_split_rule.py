"""``--split-rule nanogpt``: val holds the documents nanoGPT's prepare.py puts there, i.e. those of
``datasets``' own ``train_test_split(test_size, seed, shuffle=True)`` on the same documents."""
from __future__ import annotations

import json

import pytest
from storage_utils import tokenize

from cocomix.storage.config import TokenizeConfig
from cocomix.storage.token_store import TokenStore

N_DOCS = 300


def _docs() -> list[str]:
    return [f"doc {i} " + "the model token " * (i % 5 + 1) for i in range(N_DOCS)]


def _store_doc_ids(path) -> dict[str, list[int]]:
    """The index of every document of each split, read back from its text (``doc <i> ...``)."""
    store = TokenStore.open(path)
    tok = store.load_tokenizer()
    out = {}
    for name in store.splits:
        split, offsets = store.split(name), store.split(name).doc_offsets()
        tokens = split.read(0, len(split))
        out[name] = [int(tok.decode(tokens[a:b - 1].tolist()).split()[1]) for a, b in zip(offsets[:-1], offsets[1:])]
    return out


@pytest.mark.parametrize("kind, seed, fraction", [("jsonl", 2357, 0.05), ("txt", 11, 0.1)])
def test_nanogpt_rule_puts_the_documents_of_datasets_train_test_split_in_val(tmp_path, tokenizer_dir, kind, seed, fraction):
    import datasets

    docs = _docs()
    if kind == "jsonl":  # the document count is not known up front: counted first
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        corpus = tmp_path / "c"
        corpus.mkdir()
        for i, d in enumerate(docs):
            (corpus / f"{i:04d}.txt").write_text(d)
    result = tokenize(corpus, tokenizer_dir, tmp_path / "s", split_rule="nanogpt", seed=seed, val_fraction=fraction, batch_size=7)
    split = datasets.Dataset.from_dict({"i": list(range(N_DOCS))}).train_test_split(test_size=fraction, seed=seed, shuffle=True)
    got = _store_doc_ids(result.path)
    assert sorted(got["val"]) == sorted(split["test"]["i"]) and got["val"] == sorted(got["val"])  # kept in corpus order
    assert sorted(got["train"]) == sorted(split["train"]["i"])
    rule = TokenStore.open(result.path).provenance()["split"]
    assert rule["name"] == "nanogpt" and rule["seed"] == seed and rule["n_docs"] == N_DOCS and "permutation" in rule["rule"]


def test_openwebtext_defaults_to_nanogpts_split_and_others_to_the_hash():
    owt = TokenizeConfig(corpus="openwebtext")
    assert (owt.split_rule, owt.seed, owt.val_fraction) == ("nanogpt", 2357, 0.0005)
    local = TokenizeConfig(corpus="docs/")
    assert (local.split_rule, local.seed) == ("hash", 0)
    assert TokenizeConfig(corpus="openwebtext", split_rule="hash").seed == 0
    with pytest.raises(Exception, match="--split-rule"):
        TokenizeConfig(corpus="docs/", split_rule="random")

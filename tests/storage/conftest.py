"""Fixtures of the storage tests: the session corpus as texts and as .jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def docs(corpus_dir) -> list[str]:
    """The texts of the session corpus, in the order the tokenizer reads them."""
    return [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return path

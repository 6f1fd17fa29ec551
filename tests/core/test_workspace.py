from __future__ import annotations

import pytest

from cocomix.core.errors import CocomixError
from cocomix.core.workspace import find_single, slug, workspace_root


def test_workspace_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("COCOMIX_WORKSPACE", raising=False)
    assert str(workspace_root()) == "cocomix-workspace"
    monkeypatch.setenv("COCOMIX_WORKSPACE", str(tmp_path / "env"))
    assert workspace_root() == tmp_path / "env"
    assert workspace_root(tmp_path / "flag") == tmp_path / "flag"


def test_slug():
    assert slug("Skylion007/openwebtext") == "Skylion007--openwebtext"
    assert slug("openwebtext") == "openwebtext"


def test_find_single(tmp_path):
    with pytest.raises(CocomixError, match="--targets"):
        find_single(tmp_path, "targets", "--targets")
    (tmp_path / "targets" / "a").mkdir(parents=True)
    (tmp_path / "targets" / "a" / "manifest.json").write_text("{}")
    (tmp_path / "targets" / "half").mkdir()  # no manifest: unfinished, not counted
    assert find_single(tmp_path, "targets", "--targets") == tmp_path / "targets" / "a"
    (tmp_path / "targets" / "b").mkdir()
    (tmp_path / "targets" / "b" / "manifest.json").write_text("{}")
    with pytest.raises(CocomixError, match="several"):
        find_single(tmp_path, "targets", "--targets")


def test_find_single_tokens_needs_complete_store(tmp_path):
    import json

    half = tmp_path / "tokens" / "half"
    half.mkdir(parents=True)
    (half / "zarr.json").write_text(json.dumps({"attributes": {"complete": False}}))
    with pytest.raises(CocomixError, match="no finished tokens"):
        find_single(tmp_path, "tokens", "--tokens")
    done = tmp_path / "tokens" / "done"
    done.mkdir()
    (done / "zarr.json").write_text(json.dumps({"attributes": {"complete": True}}))
    assert find_single(tmp_path, "tokens", "--tokens") == done

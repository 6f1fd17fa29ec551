"""Teacher loading and the truncated forward (hook = output of block ``layer``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cocomix.pipeline.errors import CocomixError, ConfigError, MismatchError
from cocomix.stage1_extract.teacher import check_layer, check_tokenizer, hidden_states_at, load_teacher


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(str(teacher_dir))


def test_teacher_is_frozen_eval_with_identity(teacher):
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.info["n_layer"] == 3 and teacher.info["d_model"] == 32
    assert len(teacher.info["sha256"]) == 64


@pytest.mark.parametrize("layer", [0, 1])
def test_hidden_states_at_matches_hf_hidden_states(teacher, layer):
    """Block ``layer``'s output = HF ``hidden_states[layer + 1]`` (the last entry has ln_f applied, so stop before it)."""
    ids = torch.randint(0, 384, (2, 50), generator=torch.Generator().manual_seed(0))
    ref = teacher.model(ids, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(hidden_states_at(teacher, ids, layer), ref)


def test_last_layer_is_pre_ln_f(teacher):
    """For the last block the hook is the residual stream before ln_f (TransformerLens ``hook_resid_post``)."""
    ids = torch.randint(0, 384, (1, 20), generator=torch.Generator().manual_seed(1))
    out = teacher.model(ids, output_hidden_states=True)
    h = hidden_states_at(teacher, ids, 2)
    torch.testing.assert_close(teacher.model.transformer.ln_f(h), out.hidden_states[3])


def test_layer_out_of_range_names_valid_range(teacher):
    with pytest.raises(ConfigError, match=r"valid layers are 0\.\.2"):
        check_layer(teacher, 3)
    with pytest.raises(ConfigError, match="--layer"):
        hidden_states_at(teacher, torch.zeros(1, 4, dtype=torch.long), 7)


def test_tokenizer_mismatch_names_both(teacher, tmp_path):
    from cocomix.storage.token_store import tokenizer_fingerprint

    mine = tokenizer_fingerprint(teacher.tokenizer)
    check_tokenizer(teacher, SimpleNamespace(path=tmp_path, tokenizer_sha256=mine))
    other = SimpleNamespace(path=tmp_path / "store", tokenizer_sha256="f" * 64)
    with pytest.raises(MismatchError) as err:
        check_tokenizer(teacher, other)
    assert "ffffffffffff" in str(err.value) and mine[:12] in str(err.value) and "store" in str(err.value)


def test_offline_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CocomixError) as err:
        load_teacher("openai-community/gpt2-does-not-exist-here")
    msg = str(err.value)
    assert "--teacher" in msg and "local" in msg and "\n" not in msg


def test_not_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CocomixError, match="--teacher"):
        load_teacher(str(tmp_path))

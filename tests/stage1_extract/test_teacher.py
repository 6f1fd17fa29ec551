"""Teacher loading and the truncated forward (hook = output of block ``layer``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
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


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_fp32(teacher_dir, tmp_path, saved):
    """A teacher saved in half precision computes in fp32 (``--dtype bfloat16`` is autocast only):
    without the cast its fp16 weights meet the fp32 SAE and the attribution fails on dtypes."""
    import shutil

    from transformers import GPT2LMHeadModel

    from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
    from cocomix.stage1_extract.sae.model import TopKSAE

    folder = tmp_path / "half"
    GPT2LMHeadModel.from_pretrained(teacher_dir).to(saved).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (teacher_dir / name).exists():
            shutil.copy(teacher_dir / name, folder / name)
    half = load_teacher(str(folder))
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    sae = TopKSAE(d_in=32, n_latents=64, k=4).eval().requires_grad_(False)
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    got = label_batch(half, sae, ids, AttributionSpec(layer=1, k_attr=2, ignore_id=65535))
    assert got.ids_BTK.shape == (1, 16, 2) and bool(got.finite_B.all())


def test_auto_dtype_is_the_official_fp32_on_every_device():
    from cocomix.stage1_extract.extract import compute_dtype

    for device in ("cpu", "cuda"):
        assert compute_dtype(SimpleNamespace(dtype="auto"), torch.device(device)) is None
    assert compute_dtype(SimpleNamespace(dtype="bfloat16"), torch.device("cuda")) is torch.bfloat16


@pytest.mark.parametrize("spec, match", [("cuda", "CUDA is not available"), ("cuda:3", "CUDA is not available"),
                                          ("gpu0", "not a device")])
def test_unusable_device_is_one_clear_line(spec, match, monkeypatch):
    from cocomix.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=match):
        resolve_device(spec)
    assert resolve_device("cpu") == torch.device("cpu")

"""Every bad SAE input is a CocomixError (one line, names the file or key), never a traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.stage1_extract.sae.io import check_sae_matches_teacher, load_sae, save_sae


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_sae_width_must_match_teacher(openai_sae_file):
    _, info = load_sae(str(openai_sae_file))
    check_sae_matches_teacher(info, 32)
    with pytest.raises(MismatchError, match="SAE width 32 != teacher hidden size 48"):
        check_sae_matches_teacher(info, 48)


@pytest.mark.parametrize("key", ["encoder.weight", "decoder.weight", "pre_bias", "latent_bias"])
def test_openai_missing_key_is_named(key, openai_sae_state, sae_factories, tmp_path):
    state = {k: v for k, v in openai_sae_state.items() if k != key}
    path = sae_factories.write_openai(state, tmp_path / "sae.pt")
    with pytest.raises(IntegrityError, match=f"lacks the tensor `{key}`") as err:
        load_sae(str(path))
    assert str(path) in one_line(err)


def test_openai_wrong_shape(openai_sae_state, sae_factories, tmp_path):
    state = {**openai_sae_state, "decoder.weight": openai_sae_state["decoder.weight"][:, :100]}
    path = sae_factories.write_openai(state, tmp_path / "sae.pt")
    with pytest.raises(IntegrityError, match=r"W_dec has shape \(32, 100\), expected \(32, 256\)"):
        load_sae(str(path))


def test_openai_relu_sae_is_refused(openai_sae_state, sae_factories, tmp_path):
    state = {k: v for k, v in openai_sae_state.items() if k not in ("activation", "activation_state_dict")}
    path = sae_factories.write_openai(state, tmp_path / "sae.pt")
    with pytest.raises(CocomixError, match="only TopK SAEs"):
        load_sae(str(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_openai_corrupt_file(damage, openai_sae_file, tmp_path):
    data = openai_sae_file.read_bytes()
    bad = {"truncate": data[: len(data) // 2], "garbage": b"not a torch file" * 100, "empty": b""}[damage]
    path = tmp_path / "sae.pt"
    path.write_bytes(bad)
    with pytest.raises(IntegrityError, match="truncated or corrupt") as err:
        load_sae(str(path))
    assert str(path) in one_line(err)


def test_openai_pickle_with_code_is_refused(tmp_path):
    """weights_only=True: a file that needs arbitrary code to unpickle is refused, not executed."""
    path = tmp_path / "sae.pt"
    torch.save({"activation": "TopK", "payload": shutil.copy}, path)
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        load_sae(str(path))


def test_saelens_truncated_weights(saelens_sae_folder, tmp_path):
    folder = tmp_path / "lens"
    shutil.copytree(saelens_sae_folder, folder)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="sae_weights.safetensors: truncated or corrupt"):
        load_sae(str(folder))


def test_saelens_missing_key_and_bad_cfg(saelens_sae_folder, tmp_path):
    folder = tmp_path / "lens"
    shutil.copytree(saelens_sae_folder, folder)
    tensors = load_file(folder / "sae_weights.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(IntegrityError, match="lacks the tensor `b_enc`"):
        load_sae(str(folder))
    (folder / "cfg.json").write_text("{ not json")
    with pytest.raises(IntegrityError, match="cfg.json is not valid JSON"):
        load_sae(str(folder))


def test_saelens_non_topk_is_refused(saelens_sae_folder, tmp_path):
    folder = tmp_path / "lens"
    shutil.copytree(saelens_sae_folder, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(CocomixError, match="architecture 'jumprelu' .*only TopK"):
        load_sae(str(folder))


@pytest.fixture
def cocomix_folder(openai_sae_file, tmp_path):
    sae, _ = load_sae(str(openai_sae_file))
    return save_sae(sae, tmp_path / "mine", {"layer": 1})


def test_cocomix_tampered_weights(cocomix_folder):
    weights = cocomix_folder / "sae.safetensors"
    tensors = load_file(weights)
    tensors["W_enc"][0, 0] += 1.0
    save_file(tensors, str(weights))  # a valid file, but not the one cfg.json recorded
    with pytest.raises(IntegrityError, match="truncated or tampered: sha256") as err:
        load_sae(str(cocomix_folder))
    assert str(weights) in one_line(err)


def test_cocomix_truncated_weights(cocomix_folder):
    weights = cocomix_folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(IntegrityError, match="truncated or tampered"):
        load_sae(str(cocomix_folder))


def test_cocomix_missing_cfg(cocomix_folder):
    (cocomix_folder / "cfg.json").unlink()
    with pytest.raises(CocomixError, match="has no cfg.json"):
        load_sae(str(cocomix_folder))


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text_file"])
def test_unknown_format(make, tmp_path):
    path = tmp_path / "thing"
    if make == "empty_dir":
        path.mkdir()
    elif make == "text_file":
        path = tmp_path / "thing.txt"
        path.write_text("hello")
    with pytest.raises(CocomixError, match="does not exist|unknown SAE format") as err:
        load_sae(str(path))
    assert "openai:v5_32k/resid_post_mlp/5" in one_line(err)  # says what to pass instead

"""SAE loaders: the three formats agree, the openai: shorthand caches, every bad input is one clear error."""
import json
import shutil

import pytest
import torch

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.stage1_extract.sae import download as sae_download
from cocomix.stage1_extract.sae.io import detect_format, load_sae, save_sae
from cocomix.storage.files import sha256_file


def encodings(sae, seed=0):
    h = torch.randn(4, 9, sae.d_in, generator=torch.Generator().manual_seed(seed))
    enc = sae.encode(h)
    return enc.top_idx, enc.top_val, sae.decode(enc.top_idx, enc.top_val, enc.norm)


def test_formats_round_trip_to_identical_encodings(openai_sae_file, saelens_sae_folder, tmp_path):
    sae_pt, info_pt = load_sae(str(openai_sae_file))
    sae_lens, info_lens = load_sae(str(saelens_sae_folder))
    save_sae(sae_pt, tmp_path / "mine", {"layer": 1, "location": "resid_post"})
    sae_own, info_own = load_sae(str(tmp_path / "mine"))
    ref = encodings(sae_pt)
    for sae in (sae_lens, sae_own):
        idx, val, rec = encodings(sae)
        assert torch.equal(idx, ref[0])
        torch.testing.assert_close(val, ref[1])
        torch.testing.assert_close(rec, ref[2])
    assert [i.format for i in (info_pt, info_lens, info_own)] == ["openai", "saelens", "cocomix"]
    for info in (info_pt, info_lens, info_own):
        assert (info.d_in, info.n_latents, info.k, info.normalize) == (32, 256, 8, True)
    assert info_pt.sha256 == sha256_file(openai_sae_file)
    assert (info_lens.layer, info_lens.location) == (1, "resid_post")
    assert (info_own.layer, info_own.location) == (1, "resid_post")


def test_openai_file_matches_its_state_dict(openai_sae_file):
    sae, _ = load_sae(str(openai_sae_file))
    state = torch.load(openai_sae_file, weights_only=True)
    torch.testing.assert_close(sae.W_enc, state["encoder.weight"])
    torch.testing.assert_close(sae.W_dec, state["decoder.weight"])
    torch.testing.assert_close(sae.b_pre, state["pre_bias"])
    torch.testing.assert_close(sae.b_enc, state["latent_bias"])
    assert not any(p.requires_grad for p in sae.parameters())


def test_saelens_without_b_dec_on_input_is_folded(openai_sae_state, sae_factories, tmp_path):
    folder = sae_factories.write_saelens(openai_sae_state, tmp_path / "lens")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    sae, _ = load_sae(str(folder))
    x = torch.randn(5, 32)
    expected = x @ openai_sae_state["encoder.weight"].T + openai_sae_state["latent_bias"]  # no b_dec subtracted
    torch.testing.assert_close(sae.pre_activations(x), expected, atol=1e-5, rtol=1e-5)


def test_saelens_legacy_topk_cfg(openai_sae_file, openai_sae_state, sae_factories, tmp_path):
    """The cfg of SAELens' older OpenAI folders: `standard` architecture, TopK given as the activation."""
    folder = sae_factories.write_saelens(openai_sae_state, tmp_path / "lens")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"]
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 8})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae, info = load_sae(str(folder))
    ref, _ = load_sae(str(openai_sae_file))
    assert info.k == 8 and torch.equal(encodings(sae)[0], encodings(ref)[0])


def test_format_detection(openai_sae_file, saelens_sae_folder, tmp_path):
    assert detect_format(openai_sae_file) == "openai"
    assert detect_format(saelens_sae_folder) == "saelens"
    with pytest.raises(CocomixError, match="inside an SAE folder"):
        detect_format(saelens_sae_folder / "sae_weights.safetensors")


# ---------------------------------------------------------------- openai: shorthand


@pytest.fixture
def local_openai_host(tmp_path, openai_sae_file, monkeypatch):
    """Serve the fixture SAE at the OpenAI URL layout through file:// (no network in tests)."""
    host = tmp_path / "host"
    dest = host / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    dest.parent.mkdir(parents=True)
    shutil.copy(openai_sae_file, dest)
    monkeypatch.setattr(sae_download, "OPENAI_URL", host.as_uri() + "/{location}_{version}/autoencoders/{layer}.pt")
    return dest


def test_openai_shorthand_downloads_once_and_records_sha256(local_openai_host, tmp_path):
    cache = tmp_path / "cache"
    sae, info = load_sae("openai:v5_32k/resid_post_mlp/1", cache_dir=cache)
    assert info.sha256 == sha256_file(local_openai_host)
    assert (info.source, info.layer, info.location, info.format) == ("openai:v5_32k/resid_post_mlp/1", 1, "resid_post_mlp", "openai")
    cached = cache / "sae" / "openai" / "resid_post_mlp_v5_32k" / "1.pt"
    assert (cached.parent / "1.pt.sha256").read_text().strip() == info.sha256
    local_openai_host.unlink()  # a second load must not download again
    _, again = load_sae("openai:v5_32k/resid_post_mlp/1", cache_dir=cache)
    assert again.sha256 == info.sha256
    assert not list(cached.parent.glob(".*tmp"))


def test_openai_shorthand_default_cache_is_in_workspace(local_openai_host, tmp_path, monkeypatch):
    monkeypatch.setenv("COCOMIX_WORKSPACE", str(tmp_path / "ws"))
    load_sae("openai:v5_32k/resid_post_mlp/1")
    assert (tmp_path / "ws" / "cache" / "sae" / "openai" / "resid_post_mlp_v5_32k" / "1.pt").exists()


def test_tampered_cache_is_refused(local_openai_host, tmp_path):
    cache = tmp_path / "cache"
    load_sae("openai:v5_32k/resid_post_mlp/1", cache_dir=cache)
    cached = cache / "sae" / "openai" / "resid_post_mlp_v5_32k" / "1.pt"
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError, match="delete it to download again"):
        load_sae("openai:v5_32k/resid_post_mlp/1", cache_dir=cache)


def test_offline_download_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sae_download, "OPENAI_URL", "http://127.0.0.1:9/{location}_{version}/{layer}.pt")
    with pytest.raises(CocomixError, match="pass a local path with --sae") as err:
        load_sae("openai:v5_32k/resid_post_mlp/5", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-written in the cache


@pytest.mark.parametrize("spec, words", [
    ("openai:v9_32k/resid_post_mlp/5", "unknown version"),
    ("openai:v5_32k/resid_post/5", "unknown location"),
    ("openai:v5_32k/resid_post_mlp/12", "out of range"),
    ("openai:resid_post_mlp/5", "is not `openai:"),
])
def test_bad_shorthand(spec, words, tmp_path):
    with pytest.raises(CocomixError, match=words):
        load_sae(spec, cache_dir=tmp_path)


def test_real_url_layout():
    assert sae_download.openai_url("openai:v5_32k/resid_post_mlp/5") == (
        "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/5.pt"
    )

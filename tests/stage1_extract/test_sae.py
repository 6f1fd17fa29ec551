"""TopKSAE against plain dense references (OpenAI's formula written out)."""
import pytest
import torch
import torch.nn.functional as F

from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage1_extract.sae.model import TopKSAE, scatter_latents


def random_sae(d_in=32, n_latents=256, k=8, normalize=True, seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, n_latents, k, normalize=normalize)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def reference_latents(sae: TopKSAE, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """openai/sparse_autoencoder: LN (unbiased std), linear, topk over all latents, ReLU, scatter."""
    x = h
    if sae.normalize:
        mu = h.mean(-1, keepdim=True)
        x = h - mu
        x = x / (x.std(-1, keepdim=True) + 1e-5)
    pre = F.linear(x - sae.b_pre, sae.W_enc, sae.b_enc)
    top = torch.topk(pre, sae.k, dim=-1)
    return pre, torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))


def reference_decode(sae: TopKSAE, latents: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    out = latents @ sae.W_dec.T + sae.b_pre
    if sae.normalize:
        mu, std = h.mean(-1, keepdim=True), (h - h.mean(-1, keepdim=True)).std(-1, keepdim=True)
        out = out * std + mu
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_encode_matches_dense_reference(normalize):
    sae = random_sae(normalize=normalize)
    h_BTD = 3 * torch.randn(2, 7, 32) + 1
    enc = sae.encode(h_BTD, dense=True)
    pre_ref, z_ref = reference_latents(sae, h_BTD)
    torch.testing.assert_close(enc.pre, pre_ref)
    torch.testing.assert_close(scatter_latents(enc.top_idx, enc.top_val, sae.n_latents), z_ref)
    assert enc.top_idx.dtype == torch.int64 and enc.top_idx.shape == (2, 7, 8)
    assert (enc.top_val[..., :-1] >= enc.top_val[..., 1:]).all()  # largest first
    assert sae.encode(h_BTD).pre is None


def test_layernorm_unbiased_uses_unbiased_std():
    h = torch.randn(5, 32)
    norm = layernorm_unbiased(h)
    centered = h - h.mean(-1, keepdim=True)
    torch.testing.assert_close(norm.std, centered.pow(2).sum(-1, keepdim=True).div(31).sqrt())
    torch.testing.assert_close(norm.x, centered / (norm.std + 1e-5))


@pytest.mark.parametrize("normalize", [True, False])
def test_sparse_decode_matches_dense(normalize):
    sae = random_sae(normalize=normalize)
    h_BTD = torch.randn(3, 5, 32)
    enc = sae.encode(h_BTD)
    _, z_ref = reference_latents(sae, h_BTD)
    torch.testing.assert_close(sae.decode(enc.top_idx, enc.top_val, enc.norm), reference_decode(sae, z_ref, h_BTD))
    torch.testing.assert_close(sae(h_BTD), reference_decode(sae, z_ref, h_BTD))


def test_sparse_decode_gradients_match_dense():
    """Training backpropagates through the sparse decode: its gradients must equal the dense ones."""
    sae, ref = random_sae(seed=1).double(), random_sae(seed=1).double()
    h = torch.randn(16, 32, dtype=torch.float64)
    sae(h).pow(2).sum().backward()
    _, z = reference_latents(ref, h)
    reference_decode(ref, z, h).pow(2).sum().backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_decoder_is_stored_column_major_through_load_and_moves(openai_sae_file, tmp_path):
    """``W_dec.t()`` must stay contiguous (a row-major W_dec makes every sparse decode copy the matrix)."""
    from cocomix.stage1_extract.sae.io import load_sae, save_sae

    sae, _ = load_sae(str(openai_sae_file))
    assert sae.W_dec.t().is_contiguous()
    assert sae.double().to("cpu").W_dec.t().is_contiguous()
    save_sae(sae, tmp_path / "s", {})
    again, _ = load_sae(str(tmp_path / "s"))
    assert again.W_dec.t().is_contiguous()
    torch.testing.assert_close(again.W_dec, sae.W_dec.float())

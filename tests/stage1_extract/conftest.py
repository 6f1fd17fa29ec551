"""Fixtures of the stage-1 tests: tiny random SAEs in the formats ``load_sae`` reads.

- ``openai_sae_file``: a random OpenAI-format TopK SAE state dict (``torch.save``) sized for the
  tiny ``teacher_dir`` (d_in 32, 256 latents, k 8), keys exactly as openai/sparse_autoencoder.
- ``saelens_sae_folder``: the same weights as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).
- ``make_openai_state`` / ``write_openai_sae`` / ``write_saelens_folder``: factories for other shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SAE_LATENTS = 256
SAE_K = 8


def make_openai_state(d_in: int, n_latents: int, k: int, seed: int = 0) -> dict:
    """A random OpenAI TopK SAE state dict: unit-norm decoder columns, encoder = decoder^T (+ noise)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    decoder_DL = torch.randn(d_in, n_latents, generator=gen)
    decoder_DL /= decoder_DL.norm(dim=0, keepdim=True)
    encoder_LD = decoder_DL.T.contiguous() + 0.1 * torch.randn(n_latents, d_in, generator=gen)
    return {
        "pre_bias": 0.1 * torch.randn(d_in, generator=gen),
        "encoder.weight": encoder_LD,
        "latent_bias": 0.1 * torch.randn(n_latents, generator=gen),
        "decoder.weight": decoder_DL,
        "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
        "latents_activation_frequency": torch.rand(n_latents, generator=gen),
        "latents_mean_square": torch.rand(n_latents, generator=gen),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }


def write_openai_sae(state: dict, path: Path) -> Path:
    """Save ``state`` with ``torch.save`` as OpenAI publishes its ``.pt`` files."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_saelens_folder(state: dict, folder: Path, *, layer: int = 1) -> Path:
    """The same weights as a SAELens folder (SAELens names: W_enc, W_dec, b_enc, b_dec)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d_in, n_latents = state["decoder.weight"].shape
    tensors = {
        "W_enc": state["encoder.weight"].T.contiguous(),  # [D, L]
        "W_dec": state["decoder.weight"].T.contiguous(),  # [L, D]
        "b_enc": state["latent_bias"].clone(),
        "b_dec": state["pre_bias"].clone(),
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {
        "architecture": "topk",
        "d_in": int(d_in),
        "d_sae": int(n_latents),
        "k": int(state["activation_state_dict"]["k"]),
        "normalize_activations": "layer_norm",
        "apply_b_dec_to_input": True,
        "dtype": "float32",
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "model_name": "tiny-gpt2",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _teacher_width(teacher_dir: Path) -> int:
    return int(json.loads((Path(teacher_dir) / "config.json").read_text())["n_embd"])


@pytest.fixture(scope="session")
def openai_sae_state(teacher_dir) -> dict:
    return make_openai_state(_teacher_width(teacher_dir), SAE_LATENTS, SAE_K, seed=0)


@pytest.fixture(scope="session")
def openai_sae_file(tmp_path_factory, teacher_dir, openai_sae_state) -> Path:
    """A random OpenAI-format SAE ``.pt`` for the tiny teacher (d_in 32, 256 latents, k 8)."""
    return write_openai_sae(openai_sae_state, tmp_path_factory.mktemp("sae_openai") / "1.pt")


@pytest.fixture(scope="session")
def saelens_sae_folder(tmp_path_factory, openai_sae_state) -> Path:
    """The weights of ``openai_sae_file`` as a SAELens folder."""
    return write_saelens_folder(openai_sae_state, tmp_path_factory.mktemp("sae_saelens") / "v5_32k_layer_1.pt")


@pytest.fixture(scope="session")
def sae_factories():
    """The plain helpers above, for tests that need other shapes: ``.make_state``, ``.write_openai``, ``.write_saelens``."""
    from types import SimpleNamespace

    return SimpleNamespace(make_state=make_openai_state, write_openai=write_openai_sae, write_saelens=write_saelens_folder)

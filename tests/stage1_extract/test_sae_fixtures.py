"""The SAE fixtures write the layouts docs/ARCHITECTURE.md describes (the other stage-1 tests rely on them)."""
import json

import torch
from safetensors.torch import load_file


def test_openai_fixture_keys_and_shapes(openai_sae_file):
    state = torch.load(openai_sae_file, weights_only=True)
    assert state["encoder.weight"].shape == (256, 32)
    assert state["decoder.weight"].shape == (32, 256)
    assert state["activation"] == "TopK" and state["activation_state_dict"] == {"k": 8, "postact_fn": "ReLU"}
    torch.testing.assert_close(state["decoder.weight"].norm(dim=0), torch.ones(256))


def test_saelens_fixture_matches_openai(openai_sae_file, saelens_sae_folder):
    state = torch.load(openai_sae_file, weights_only=True)
    tensors = load_file(saelens_sae_folder / "sae_weights.safetensors")
    torch.testing.assert_close(tensors["W_enc"], state["encoder.weight"].T)
    torch.testing.assert_close(tensors["W_dec"], state["decoder.weight"].T)
    cfg = json.loads((saelens_sae_folder / "cfg.json").read_text())
    assert cfg["k"] == 8 and cfg["normalize_activations"] == "layer_norm"

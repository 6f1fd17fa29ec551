"""Fidelity of the efficient attribution against plain implementations of the official formula.

The reference (:mod:`cocomix.stage1_extract.official`, shared with ``bench/extract.py``) follows
RAM ``projects/cocomix/models/concept_extractor.py``: the whole teacher forward (HF GPT-2, and
the official code's own TransformerLens teacher), ``loss.backward()`` with every parameter
requiring grad, the OpenAI SAE encode written out from the state dict, the dense
``(grad_x @ decoder.weight) * latents`` and ``torch.topk`` over all latents. Every slot with a
positive score must be identical; every other slot must be ``ignore_id`` (the deliberate
difference from the official code).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cocomix.stage1_extract import attribution as attr
from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
from cocomix.stage1_extract.official import hf_grad, official_attribution, official_labels, tl_grad, tl_teacher_from_hf
from cocomix.stage1_extract.official import openai_encode as official_encode
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.stage1_extract.teacher import load_teacher

IGNORE = 65535
LAYER = 1


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(str(teacher_dir))


def sae_from_state(state: dict) -> TopKSAE:
    d_in, n_latents = state["decoder.weight"].shape
    sae = TopKSAE(d_in, n_latents, state["activation_state_dict"]["k"], normalize=True)
    with torch.no_grad():
        sae.W_enc.copy_(state["encoder.weight"])
        sae.b_enc.copy_(state["latent_bias"])
        sae.W_dec.copy_(state["decoder.weight"])
        sae.b_pre.copy_(state["pre_bias"])
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def sae(openai_sae_state):
    return sae_from_state(openai_sae_state)


def official_grad(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hooked activation and its gradient from a full forward and ``loss.backward()`` (params require grad)."""
    return hf_grad(model, ids, layer)


def assert_same_labels(got_ids, got_scores, ref_vals, ref_idx, score_scale=1.0):
    valid = ref_vals > 0
    assert valid.any() and (~valid).any()
    assert torch.equal(got_ids[valid], ref_idx[valid])
    assert (got_ids[~valid] == IGNORE).all()
    torch.testing.assert_close(got_scores[valid], ref_vals[valid] * score_scale, rtol=1e-4, atol=1e-7)
    assert (got_scores[~valid] == 0).all()


def windows(n: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k_attr", [4, 8])
def test_attribution_post_matches_official(teacher, sae, openai_sae_state, k_attr):
    ids = windows(3, 40)
    got = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, k_attr=k_attr, ignore_id=IGNORE))
    x, g = official_grad(teacher.model, ids, LAYER)
    latents, _ = official_encode(openai_sae_state, x)
    vals, idx = official_labels((g @ openai_sae_state["decoder.weight"]) * latents, k_attr)
    # our loss is the mean per window; the official mean over the batch scales every score by 1/B
    assert_same_labels(got.ids_BTK, got.scores_BTK, vals, idx, score_scale=ids.shape[0])
    assert (got.ids_BTK[:, -1] == IGNORE).all()  # the last position has g = 0: no label, not arbitrary ones
    assert got.finite_B.all()


def test_single_window_scores_equal_official(teacher, sae, openai_sae_state):
    ids = windows(1, 33, seed=3)
    got = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, k_attr=4, ignore_id=IGNORE))
    x, g = official_grad(teacher.model, ids, LAYER)
    latents, _ = official_encode(openai_sae_state, x)
    vals, idx = official_labels((g @ openai_sae_state["decoder.weight"]) * latents, 4)
    assert_same_labels(got.ids_BTK, got.scores_BTK, vals, idx)


def test_attribution_pre_matches_paper_eq1(teacher, sae, openai_sae_state):
    ids = windows(2, 30, seed=1)
    spec = AttributionSpec(layer=LAYER, k_attr=4, attribution_input="pre", ignore_id=IGNORE)
    got = label_batch(teacher, sae, ids, spec)
    x, g = official_grad(teacher.model, ids, LAYER)
    _, pre = official_encode(openai_sae_state, x)
    vals, idx = official_labels((g @ openai_sae_state["decoder.weight"]) * pre, 4)
    assert_same_labels(got.ids_BTK, got.scores_BTK, vals, idx, score_scale=ids.shape[0])


def test_activation_selection_matches_plain_topk(teacher, sae, openai_sae_state):
    ids = windows(2, 30, seed=2)
    got = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, k_attr=4, selection="activation", ignore_id=IGNORE))
    x = teacher.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    latents, _ = official_encode(openai_sae_state, x)
    vals, idx = torch.topk(latents, 4, dim=-1)
    valid = vals > 0
    assert torch.equal(got.ids_BTK[valid], idx[valid]) and (got.ids_BTK[~valid] == IGNORE).all()
    torch.testing.assert_close(got.scores_BTK[valid], vals[valid])


def test_labels_do_not_depend_on_batch_composition(teacher, sae):
    """A window's labels and scores are the same alone or batched (the per-window loss)."""
    ids = windows(3, 24, seed=4)
    spec = AttributionSpec(layer=LAYER, k_attr=4, ignore_id=IGNORE)
    batched = label_batch(teacher, sae, ids, spec)
    alone = label_batch(teacher, sae, ids[1:2], spec)
    assert torch.equal(batched.ids_BTK[1], alone.ids_BTK[0])
    torch.testing.assert_close(batched.scores_BTK[1], alone.scores_BTK[0])


def test_chunked_head_equals_unchunked(teacher, sae, monkeypatch):
    """Chunks of the head (smaller than a window) give the same loss and labels as one chunk."""
    ids = windows(2, 40, seed=5)
    spec = AttributionSpec(layer=LAYER, k_attr=4, ignore_id=IGNORE)
    whole = label_batch(teacher, sae, ids, spec)
    monkeypatch.setattr(attr, "HEAD_CHUNK_TOKENS", 14)  # 7 rows per chunk at B = 2
    monkeypatch.setattr(attr, "GATHER_CHUNK_TOKENS", 9)
    monkeypatch.setattr(attr, "ENCODE_CHUNK_TOKENS", 23)
    chunked = label_batch(teacher, sae, ids, spec)
    torch.testing.assert_close(chunked.loss_B, whole.loss_B)
    assert torch.equal(chunked.ids_BTK, whole.ids_BTK)
    torch.testing.assert_close(chunked.scores_BTK, whole.scores_BTK)


def test_loss_is_mean_ce_per_window(teacher, sae):
    ids = windows(2, 25, seed=6)
    got = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, ignore_id=IGNORE))
    logits = teacher.model(ids).logits
    ref = torch.stack([F.cross_entropy(logits[b, :-1], ids[b, 1:]) for b in range(2)])
    torch.testing.assert_close(got.loss_B, ref)


def test_one_token_window_has_no_labels(teacher, sae):
    got = label_batch(teacher, sae, windows(1, 1), AttributionSpec(layer=LAYER, ignore_id=IGNORE))
    assert (got.ids_BTK == IGNORE).all() and got.finite_B.all()


def test_non_finite_window_is_flagged(teacher, sae):
    bad = copy.deepcopy(teacher)
    bad.model.lm_head.weight = torch.nn.Parameter(bad.model.lm_head.weight.clone(), requires_grad=False)  # untie
    with torch.no_grad():
        bad.model.transformer.wte.weight[7] = float("nan")  # only windows containing token 7 go non-finite
    ids = windows(2, 10, seed=7)
    ids[1, 3] = 7
    got = label_batch(bad, sae, ids, AttributionSpec(layer=LAYER, ignore_id=IGNORE))
    assert got.finite_B.tolist() == [True, False]


def test_head_sees_at_most_one_chunk_of_rows(teacher, sae, monkeypatch):
    """[B, T, V] logits never exist at once: the head runs on <= HEAD_CHUNK_TOKENS rows per call, once per prediction."""
    monkeypatch.setattr(attr, "HEAD_CHUNK_TOKENS", 24)
    rows = []
    handle = teacher.model.lm_head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0] if inp[0].dim() == 2 else inp[0].shape[0] * inp[0].shape[1]))
    try:
        label_batch(teacher, sae, windows(3, 40, seed=8), AttributionSpec(layer=LAYER, ignore_id=IGNORE))
    finally:
        handle.remove()
    assert max(rows) <= 24 and sum(rows) == 3 * 39


def test_bf16_autocast_path_runs_and_agrees(teacher, sae):
    """The CUDA default (bf16 autocast, fp32 loss) exercised on CPU autocast: close to fp32."""
    ids = windows(3, 48, seed=9)
    fp32 = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, ignore_id=IGNORE))
    bf16 = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, ignore_id=IGNORE, autocast_dtype=torch.bfloat16))
    assert bf16.scores_BTK.dtype == torch.float32 and bf16.loss_B.dtype == torch.float32
    torch.testing.assert_close(bf16.loss_B, fp32.loss_B, rtol=2e-2, atol=1e-3)
    valid = fp32.ids_BTK != IGNORE
    assert (bf16.ids_BTK[valid] == fp32.ids_BTK[valid]).float().mean() > 0.9


def test_labels_equal_the_official_extractor_on_its_transformerlens_teacher(teacher, sae, openai_sae_state):
    """The official code's own path: a TransformerLens HookedTransformer made from the same HF weights
    (LayerNorms folded, writing weights centred, as ``from_pretrained``), fwd/bwd hooks on
    ``hook_resid_post``, OpenAI's SAE formulas. Every positive slot equal, every other ignore_id."""
    tl_model = tl_teacher_from_hf(teacher.model)
    ids = windows(3, 48, seed=10)
    x, g = tl_grad(tl_model, ids, LAYER)
    assert next(iter(p.grad for p in tl_model.parameters() if p.grad is not None)) is not None  # parameter grads, as official
    vals, idx = official_attribution(openai_sae_state, x, g, 4)
    got = label_batch(teacher, sae, ids, AttributionSpec(layer=LAYER, k_attr=4, ignore_id=IGNORE))
    assert_same_labels(got.ids_BTK, got.scores_BTK, vals, idx, score_scale=ids.shape[0])
    hf_x, _ = hf_grad(teacher.model, ids, LAYER)
    assert not torch.allclose(x, hf_x)  # TransformerLens centred the residual stream: really another teacher path

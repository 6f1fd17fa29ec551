"""Presets pinned to the paper's table, model construction, and matched active parameter counts."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2LMHeadModel

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.model import CoCoMixForCausalLM
from cocomix.stage2_pretrain.presets import (
    PAPER_LATENTS,
    PAPER_VOCAB,
    PRESETS,
    build_model,
    count_on_meta,
    count_params,
    get_preset,
    match_ntp_width,
)

# the paper's table: size -> (cocomix d, ntp d, layers, heads, insert layer, lr, min lr, batch tokens, steps)
TABLE = {
    "69m": (512, 624, 8, 8, 3, 6e-4, 6e-5, 512 * 1024, 40_000),
    "386m": (1024, 1072, 24, 16, 5, 3e-4, 3e-5, 512 * 1024, 40_000),
    "1b": (2048, 2096, 24, 16, 5, 2e-4, 2e-5, 1024 * 1024, 20_000),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_paper_presets_match_the_design_table(name):
    p = get_preset(name)
    got = (p.cocomix_d, p.ntp_d, p.n_layer, p.n_head, p.insert_layer, p.lr, p.min_lr, p.batch_tokens, p.max_steps)
    assert got == TABLE[name]
    assert (p.context, p.k_concept) == (1024, 32)
    assert p.batch_tokens * p.max_steps == pytest.approx(20e9, rel=0.05)  # 20B tokens
    assert p.batch_tokens % (p.micro_batch * p.context) == 0


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny, 69m, 386m, 1b"):
        get_preset("70m")


@pytest.mark.parametrize("name", ["69m", "386m", "1b"])
def test_ntp_width_matches_cocomix_active_params_within_2_percent(name):
    p = get_preset(name)
    cocomix = count_on_meta("cocomix", p, vocab_size=PAPER_VOCAB, n_latents=PAPER_LATENTS)
    ntp = count_on_meta("ntp", p, vocab_size=PAPER_VOCAB)
    assert abs(ntp.active / cocomix.active - 1) < 0.02
    assert cocomix.total - cocomix.active == (PAPER_LATENTS - 32) * p.cocomix_d
    assert ntp.total == ntp.active


def test_paper_counts_carry_the_paper_names():
    ntp_69m = count_on_meta("ntp", get_preset("69m"), vocab_size=PAPER_VOCAB)
    ntp_386m = count_on_meta("ntp", get_preset("386m"), vocab_size=PAPER_VOCAB)
    cocomix_1b = count_on_meta("cocomix", get_preset("1b"), vocab_size=PAPER_VOCAB, n_latents=PAPER_LATENTS)
    assert round(ntp_69m.total / 1e6) == 69
    assert round(ntp_386m.total / 1e6) == 386
    assert round(cocomix_1b.active / 1e8) == 14  # "1.38B"


def test_count_params_counts_tied_matrix_once_and_position_embeddings():
    p = get_preset("tiny")
    ntp = build_model("ntp", p, vocab_size=100)
    assert isinstance(ntp, GPT2LMHeadModel) and ntp.config.n_embd == p.ntp_d
    d, n = p.ntp_d, p.n_layer
    per_block = 12 * d * d + 13 * d
    expected = n * per_block + 100 * d + p.context * d + 2 * d  # blocks, wte (= lm_head), wpe, ln_f
    assert count_params(ntp).total == expected == ntp.num_parameters()


def test_cocomix_active_counts_k_concept_columns_of_w_comp():
    p = get_preset("tiny")
    model = build_model("cocomix", p, vocab_size=100, n_latents=256, k_attr=3, ignore_id=999, eos_id=5)
    assert isinstance(model, CoCoMixForCausalLM)
    cfg = model.config
    assert (cfg.n_embd, cfg.insert_layer, cfg.k_concept, cfg.k_attr, cfg.ignore_id, cfg.eos_token_id) == \
        (64, 1, 8, 3, 999, 5)
    d = p.cocomix_d
    body = p.n_layer * (12 * d * d + 13 * d) + 100 * d + p.context * d + 2 * d
    head = d * 256 + 256  # W_pred, b_pred
    counts = count_params(model)
    assert counts.total == body + head + 256 * d + d + d  # + W_comp, b_comp, b_pre
    assert counts.active == body + head + p.k_concept * d + d + d


def test_build_model_refuses_too_few_latents():
    with pytest.raises(ConfigError, match="n_latents"):
        build_model("cocomix", get_preset("tiny"), vocab_size=100, n_latents=4)
    with pytest.raises(ConfigError, match="--method"):
        build_model("kd", get_preset("tiny"), vocab_size=100)


def test_match_ntp_width_finds_the_closest_multiple_of_n_head():
    p = get_preset("tiny")
    match = match_ntp_width(p, vocab_size=384, n_latents=512, k_attr=4)
    assert match.preset.ntp_d % p.n_head == 0
    assert dataclasses.replace(match.preset, ntp_d=p.ntp_d) == p
    gap = abs(match.ntp.active - match.cocomix.active)
    for other in (match.preset.ntp_d - p.n_head, match.preset.ntp_d + p.n_head):
        other_count = count_on_meta("ntp", dataclasses.replace(p, ntp_d=other), vocab_size=384)
        assert abs(other_count.active - match.cocomix.active) >= gap
    assert match.ratio == match.ntp.active / match.cocomix.active


def test_tiny_ntp_width_is_matched_for_the_quickstart_defaults():
    p = get_preset("tiny")
    assert match_ntp_width(p, vocab_size=4096, n_latents=1024).preset.ntp_d == p.ntp_d


@pytest.mark.parametrize("size, width", [("69m", 624), ("386m", 1072), ("1b", 2096)])
def test_paper_targets_keep_the_paper_ntp_widths(size, width):
    """`pretrain --method ntp --targets` on the paper's targets trains the paper's baseline."""
    match = match_ntp_width(get_preset(size), vocab_size=PAPER_VOCAB, n_latents=PAPER_LATENTS)
    assert match.preset.ntp_d == width and abs(match.ratio - 1) < 0.02


def test_match_ntp_width_search_lands_near_the_paper_69m_width():
    """The search itself (a vocabulary one id off the paper's) finds a width next to the table's."""
    match = match_ntp_width(get_preset("69m"), vocab_size=PAPER_VOCAB + 1, n_latents=PAPER_LATENTS)
    assert abs(match.preset.ntp_d - 624) <= 16 and abs(match.ratio - 1) < 0.01


def test_every_preset_builds_a_working_tiny_forward():
    p = get_preset("tiny")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, p.context))
    for method in ("cocomix", "ntp"):
        model = build_model(method, p, vocab_size=100, n_latents=64)
        out = model(input_ids=ids, labels=ids)
        assert out.logits.shape == (2, p.context, 100) and torch.isfinite(out.loss)
    assert set(PRESETS) == {"tiny", "69m", "386m", "1b"}

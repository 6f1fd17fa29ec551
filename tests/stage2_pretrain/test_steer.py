"""``cocomix steer``: the steered concept step against the official formula, scale 1 = plain generation,
the teacher steered along the SAE latent, and one-line refusals."""
from __future__ import annotations

import pytest
import torch
from generate_utils import C, L, cocomix, ntp, prompt
from torch.testing import assert_close
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cocomix.pipeline.cli import app
from cocomix.pipeline.steer import SteeredBottleneck, run_steer, steer_residual, steer_topk, steered
from cocomix.stage1_extract.sae.model import TopKSAE, scatter_latents
from cocomix.stage2_pretrain.generate import Sampling, generate, make_decoder
from cocomix.stage2_pretrain.generate_config import SteerConfig

runner = CliRunner()


def test_steer_topk_scales_the_latent_and_keeps_it_active():
    z = torch.randn(2, 5, L, generator=torch.Generator().manual_seed(0))
    j = int(z[0, 0].argmin())  # the weakest latent at (0, 0): never in the plain top-C there
    for scale in (-10.0, 0.0, 0.5, 5.0):
        val, idx = steer_topk(z, [j], scale, C)
        assert bool((idx == j).any(-1).all()), "the steered latent is in every active set"
        assert_close(val[idx == j], z[..., j].flatten() * scale)
        others = torch.where(idx == j, -1, idx)  # the rest: the best of the other latents, by unscaled rank
        rest = z.index_fill(-1, torch.tensor([j]), float("-inf")).topk(C - 1, dim=-1).indices
        assert torch.equal(others.sort(-1).values[..., 1:], rest.sort(-1).values)
    val, idx = steer_topk(z, [j], 1.0, C)
    plain = z.topk(C, dim=-1)
    assert torch.equal(val, plain.values) and torch.equal(idx, plain.indices)


def test_steered_concept_equals_the_official_dense_formula_on_the_steered_logits():
    model, h = cocomix(), torch.randn(2, 5, 32) * 3 + 1
    j, scale = 7, -4.0
    step = SteeredBottleneck(model.concept, [j], scale)(h)
    b = model.concept
    mu, std = h.mean(-1, keepdim=True), (h - h.mean(-1, keepdim=True)).std(-1, keepdim=True)
    z = ((h - mu) / (std + 1e-5) - b.pre_bias) @ b.predictor.weight.T + b.predictor.bias
    keep = z.index_fill(-1, torch.tensor([j]), float("inf")).topk(C, dim=-1).indices
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, keep, True)
    z_steered = z.clone()
    z_steered[..., j] *= scale
    c = ((mask * z_steered) @ b.compress.weight + b.compress_bias + b.pre_bias) * std + mu
    assert_close(step.c_BTD, c, rtol=1e-5, atol=1e-5)
    assert_close(step.z_BTL, z)  # the logits reported are the model's own


def test_scale_1_reproduces_plain_generation_exactly():
    model = cocomix()
    kw = dict(max_new_tokens=20, sampling=Sampling(temperature=1.0, top_k=10), seed=5, keep_logits=True)
    plain = generate(make_decoder(model), prompt(), **kw)
    with steered(model, [3, 11], 1.0):
        same = generate(make_decoder(model), prompt(), **kw)
    assert torch.equal(plain.new_ids_BT, same.new_ids_BT)
    for a, b in zip(plain.logits, same.logits, strict=True):
        assert torch.equal(a, b)
    assert type(model.concept).__name__ == "ConceptBottleneck", "the bottleneck is restored after the block"


def test_steered_generation_is_the_same_with_and_without_cache_and_differs_from_plain():
    model = cocomix()
    kw = dict(max_new_tokens=15, sampling=Sampling(temperature=0), keep_logits=True)
    plain = generate(make_decoder(model), prompt(), **kw)
    with steered(model, [3], 40.0):
        cached = generate(make_decoder(model, cache=True), prompt(), **kw)
        full = generate(make_decoder(model, cache=False), prompt(), **kw)
    for a, b in zip(cached.logits, full.logits, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain.logits[0], cached.logits[0], atol=1e-3), "steering changes the logits"


def test_teacher_steering_sets_the_latents_code_value_to_scale_times_its_pre_activation():
    torch.manual_seed(0)
    sae = TopKSAE(d_in=16, n_latents=40, k=4)
    for p in sae.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(2, 6, 16) * 2 + 0.5
    j, scale = 9, 3.0
    enc = sae.encode(h, dense=True)
    code = scatter_latents(enc.top_idx, enc.top_val, 40)
    steered_code = code.clone()
    steered_code[..., j] = scale * enc.pre[..., j]
    # the decoder's change between the two codes is what is added to h (the SAE's error stays in h)
    expected = h + (steered_code - code) @ sae.W_dec.T * enc.norm.std
    assert_close(steer_residual(sae, h, [j], scale), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(steer_residual(sae, h, [j], 1.0), h)


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, teacher_dir):
    """A CoCoMix checkpoint over the shared tokenizer, an NTP one, and SAEs for the shared teacher (width 32)."""
    from cocomix.stage1_extract.sae.io import save_sae

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("steer")
    student = cocomix(vocab=len(tok))
    student.config.concept_provenance = {"sae": {"layer": 1}}
    for name, model in (("cocomix", student), ("ntp", ntp(vocab=len(tok)))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    for name, n_latents in (("sae", L), ("sae-wide", 2 * L)):
        torch.manual_seed(1)
        sae = TopKSAE(d_in=32, n_latents=n_latents, k=4)
        for p in sae.parameters():
            torch.nn.init.normal_(p, std=0.3)
        save_sae(sae, root / name, {"layer": 1, "location": "resid_post"})
    return root


def steer_args(setup, *extra):
    return ["steer", str(setup / "cocomix"), "--prompt", "the model of", "--max-new-tokens", "6", "--no-stop-at-eos", *extra]


def test_steer_prints_one_row_per_scale_beside_the_teacher(setup, teacher_dir):
    result = runner.invoke(app, steer_args(setup, "--concept", "5", "--scales", "-10,1,10", "--teacher", str(teacher_dir),
                                           "--sae", str(setup / "sae")), terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "steering latent 5" in result.output and "teacher" in result.output and "active in SAE" in result.output
    for scale in ("-10", "1", "10"):
        assert f"│ {scale:>5} │" in result.output


def test_steer_scale_1_row_is_the_plain_generation_for_student_and_teacher(setup, teacher_dir):
    from cocomix.stage2_pretrain.generate import GenerateConfig, run_generate

    common = dict(prompt="the model of", max_new_tokens=8, seed=2, stop_at_eos=False)
    res = run_steer(SteerConfig(ckpt=str(setup / "cocomix"), concept="5,6", scales="1,8", teacher=str(teacher_dir),
                                sae=str(setup / "sae"), **common))
    assert res.rows[0].student == run_generate(GenerateConfig(ckpt=str(setup / "cocomix"), **common)).completion
    assert res.rows[0].teacher == run_generate(GenerateConfig(ckpt=str(teacher_dir), **common)).completion
    assert res.rows[1].student != res.rows[0].student or res.rows[1].teacher != res.rows[0].teacher
    assert len(res.rows[0].student_active) == 2 and all(0 <= s <= 1 for s in res.rows[0].teacher_active)


@pytest.mark.parametrize(("extra", "message"), [
    (["--concept", str(L)], f"--concept {L} is out of range: the student predicts {L} latents"),
    (["--concept", "1", "--sae", "SAE-WIDE", "--teacher", "TEACHER"], f"has {2 * L} latents but the student predicts {L}"),
    (["--concept", "1", "--prompt", ""], "--prompt is empty"),
    (["--concept", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--concept", "1,2,3,4,5,6,7"], f"the student keeps only {C} active"),
    (["--concept", "x"], "--concept must be comma-separated integers"),
    (["--concept", "1", "--sae", "SAE-WIDE"], "--teacher and --sae go together"),
])
def test_bad_steer_input_is_one_line(setup, teacher_dir, extra, message):
    extra = [{"SAE-WIDE": str(setup / "sae-wide"), "TEACHER": str(teacher_dir)}.get(a, a) for a in extra]
    result = runner.invoke(app, steer_args(setup, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_steering_an_ntp_checkpoint_says_it_has_no_concepts(setup):
    result = runner.invoke(app, ["steer", str(setup / "ntp"), "--prompt", "the", "--concept", "1"])
    assert result.exit_code == 2
    assert "predicts no concepts, so there is nothing to steer" in result.output and "Traceback" not in result.output

"""The students beside CoCoMix (KD, pause, the CoCoMix ablations) as models: causality, where the
logits come from, losses against plain formulas, save/reload (tiny shapes, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from cocomix.stage2_pretrain.hidden_target import HIDDEN_LOSSES
from cocomix.stage2_pretrain.kd import kd_reference, ntp_and_kd
from cocomix.stage2_pretrain.methods import MethodSpec, StudentShape, build_student, match_width, micro_loss
from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM, concept_ce, next_token_loss
from cocomix.stage2_pretrain.model_pause import PauseConfig, PauseForCausalLM
from cocomix.stage2_pretrain.presets import get_preset

V, L, C, K, E = 97, 48, 6, 4, 20  # vocabulary, latents, kept logits, labels, teacher width


def cocomix(seed: int = 0, **kw) -> CoCoMixForCausalLM:
    torch.manual_seed(seed)
    cfg = CoCoMixConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4, insert_layer=1,
                        n_latents=L, k_concept=C, k_attr=K, d_teacher=E, **kw)
    return CoCoMixForCausalLM(cfg).eval()


def pause(seed: int = 0) -> PauseForCausalLM:
    torch.manual_seed(seed)
    return PauseForCausalLM(PauseConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4, insert_layer=1)).eval()


MODELS = {
    "pause": pause,
    "mix-add": lambda: cocomix(mix="add"),
    "mix-none": lambda: cocomix(mix="none"),
    "hidden": lambda: cocomix(concept_target="hidden"),
    "hidden-add": lambda: cocomix(concept_target="hidden", mix="add", hidden_loss="l1"),
}


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class Capture:
    def __init__(self, module: torch.nn.Module):
        self.value = None
        module.register_forward_hook(lambda m, args, out: setattr(self, "value", out))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("t", [0, 6])
def test_no_position_sees_a_later_token(name, t):
    model, ids = MODELS[name](), tokens()
    last = Capture(model.transformer.h[-1])
    a = model(ids).logits
    hidden_a = last.value
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V
    b = model(changed).logits
    per_token = 2 if hidden_a.shape[1] == 2 * ids.shape[1] else 1  # interleaved students run 2T positions
    assert_close(b[:, : t + 1], a[:, : t + 1], rtol=0, atol=1e-6)
    assert_close(last.value[:, : per_token * (t + 1)], hidden_a[:, : per_token * (t + 1)], rtol=0, atol=1e-6)
    assert not torch.allclose(b[:, t + 1], a[:, t + 1])  # the test can see a change


@pytest.mark.parametrize("name, interleaved", [("pause", True), ("mix-add", False), ("mix-none", False),
                                               ("hidden", True), ("hidden-add", False)])
def test_logits_come_from_the_documented_positions(name, interleaved):
    model, ids = MODELS[name](), tokens()
    last = Capture(model.transformer.h[-1])
    logits = model(ids).logits
    B, T = ids.shape
    assert logits.shape == (B, T, V)
    assert last.value.shape[1] == (2 * T if interleaved else T)
    read = last.value[:, 1::2] if interleaved else last.value
    assert_close(logits, model.lm_head(model.transformer.ln_f(read)))


def test_pause_interleaves_one_learned_vector_after_every_token():
    model, ids = pause(), tokens()
    upper = []
    model.transformer.h[1].register_forward_pre_hook(lambda m, args: upper.append(args[0]))
    model(ids)
    x = upper[0]
    assert x.shape == (2, 24, 32)
    assert_close(x[:, 1::2], model.pause.expand(2, 12, -1))
    assert not hasattr(model, "concept")  # no concept head, no concept loss


def test_mix_add_adds_the_concept_on_t_positions_and_none_inserts_nothing():
    add, none, ids = cocomix(mix="add"), cocomix(mix="none"), tokens()
    seen = {}
    for name, model in (("add", add), ("none", none)):
        model.transformer.h[1].register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
        lower = Capture(model.transformer.h[0])
        model(ids)
        seen[name + "_h"] = lower.value
    step = add.concept(seen["add_h"])
    assert_close(seen["add"], seen["add_h"] + step.c_BTD)
    assert_close(seen["none"], seen["none_h"])
    assert not hasattr(none.concept, "compress")  # prediction only: no compression layer to train


def test_mix_none_concept_loss_equals_the_plain_concept_ce():
    model, ids = cocomix(mix="none"), tokens()
    labels = torch.randint(0, L, (2, 12, K), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = 65535
    out = model(ids, concept_ids=labels)
    assert_close(out.concept_loss, concept_ce(out.concept_logits, labels, 65535))


@pytest.mark.parametrize("loss", ["l1", "l2", "cosine"])
def test_hidden_losses_equal_the_plain_formulas(loss):
    model, ids = cocomix(concept_target="hidden", hidden_loss=loss), tokens()
    teacher = torch.randn(2, 12, E) * 30 + 5
    out = model(ids, teacher_hidden=teacher.half())
    t = teacher.half().float()
    target = (t - t.mean(-1, keepdim=True)) / (t.std(-1, keepdim=True) + 1e-5)
    pred = out.concept_logits
    want = {"l1": (pred - target).abs().mean(), "l2": F.mse_loss(pred, target),
            "cosine": 1 - F.cosine_similarity(pred, target, dim=-1).mean()}[loss]
    assert_close(out.concept_loss, want)
    assert set(HIDDEN_LOSSES) == {"l1", "l2", "cosine"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_equals_the_plain_formula_and_its_gradient(dtype, monkeypatch):
    from cocomix.stage2_pretrain.kd import FusedKd

    monkeypatch.setattr(FusedKd, "CHUNK", 5)  # several chunks, the last one partial
    logits = torch.randn(2, 9, V).to(dtype).requires_grad_(True)
    ids = tokens(2, 9)
    kd_ids = torch.randint(0, V, (2, 9, 5), generator=torch.Generator().manual_seed(7))
    kd_ids[0, 0] = 3  # duplicate draws count each time
    got, want = ntp_and_kd(logits, ids, kd_ids), kd_reference(logits, ids, kd_ids)
    assert_close(got.ntp, want.ntp) and assert_close(got.kd, want.kd)
    (g_got,) = torch.autograd.grad(0.3 * got.ntp + 0.7 * got.kd, logits)
    (g_want,) = torch.autograd.grad(0.3 * want.ntp + 0.7 * want.kd, logits)
    assert g_got.dtype == dtype
    assert_close(g_got, g_want)
    assert (g_got[:, -1] == 0).all()  # the last position of a window predicts nothing


def test_micro_loss_combines_the_parts_per_method():
    from cocomix.stage2_pretrain.data import MicroBatch

    ids = tokens(2, 16)
    kd = torch.randint(0, V, (2, 16, 3), generator=torch.Generator().manual_seed(3))
    mb = MicroBatch(ids, None, {"kd_ids": kd})
    torch.manual_seed(0)
    gpt2 = build_student(MethodSpec("kd", kd_alpha=0.25), get_preset("tiny"), 32, StudentShape(V))
    out = micro_loss(MethodSpec("kd", kd_alpha=0.25), gpt2, mb, "cpu")
    ref = kd_reference(gpt2(input_ids=ids).logits, ids, kd)
    assert_close(out.loss, 0.75 * ref.ntp + 0.25 * ref.kd)
    model = pause()
    out = micro_loss(MethodSpec("pause"), model, mb, "cpu")
    assert_close(out.loss, next_token_loss(model(ids).logits, ids)) and set(out.parts) == {"ntp_loss"}


@pytest.mark.parametrize("name", MODELS)
def test_save_and_reload_give_identical_logits(tmp_path, name):
    model, ids = MODELS[name](), tokens()
    model.save_pretrained(tmp_path)
    for again in (type(model).from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(again) is type(model)
        assert_close(again.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [MethodSpec("ntp"), MethodSpec("kd"), MethodSpec("pause"), MethodSpec("pause-kd"),
                                  MethodSpec(mix="add"), MethodSpec(mix="none"), MethodSpec(k_concept=4),
                                  MethodSpec(concept_target="hidden"), MethodSpec(concept_target="hidden", mix="none")])
def test_every_method_is_matched_to_the_cocomix_student(spec):
    preset, shape = get_preset("tiny"), StudentShape(384, 96, 4, 65535, 0, 24)
    match = match_width(spec, preset, shape)
    assert match.width % preset.n_head == 0 and abs(match.ratio - 1) < 0.03, match
    for other in (match.width - preset.n_head, match.width + preset.n_head):  # no multiple of n_head is closer
        from cocomix.stage2_pretrain.methods import active_on_meta

        assert abs(active_on_meta(spec, preset, other, shape).active - match.reference.active) >= \
            abs(match.count.active - match.reference.active)

"""The CoCoMix student against the official model (tiny shapes, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage2_pretrain.model import (
    CoCoMixConfig,
    CoCoMixForCausalLM,
    SelectAndScore,
    concept_ce,
    interleave,
    next_token_loss,
)

V, L, C, K, IGNORE = 97, 48, 6, 4, 65535


def make_model(insert_layer: int = 1, seed: int = 0, **kw) -> CoCoMixForCausalLM:
    torch.manual_seed(seed)
    cfg = CoCoMixConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4, insert_layer=insert_layer,
                        n_latents=L, k_concept=C, k_attr=K, ignore_id=IGNORE, **kw)
    model = CoCoMixForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases so that every term of the formulas is exercised
        model.concept.pre_bias.normal_(0, 0.1)
        model.concept.compress_bias.normal_(0, 0.1)
    return model


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def labels(B: int = 2, T: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, L, (B, T, K), generator=torch.Generator().manual_seed(seed))


class Capture:
    """Records a block's input or output (forward hooks only capture, they never change anything)."""

    def __init__(self, module: torch.nn.Module, what: str):
        self.value = None
        if what == "input":
            self.handle = module.register_forward_pre_hook(lambda m, args: setattr(self, "value", args[0]))
        else:
            self.handle = module.register_forward_hook(lambda m, args, out: setattr(self, "value", out))


def test_interleave_puts_tokens_at_even_and_concepts_at_odd_positions():
    h = torch.arange(2 * 3 * 2.0).view(2, 3, 2)
    x = interleave(h, -h)
    assert x.shape == (2, 6, 2)
    assert torch.equal(x[:, 0::2], h) and torch.equal(x[:, 1::2], -h)
    assert torch.equal(x[0, :2], torch.stack([h[0, 0], -h[0, 0]]))


@pytest.mark.parametrize("insert_layer", [0, 1, 2])
def test_upper_blocks_see_h_c_interleaved_on_2T_positions(insert_layer):
    model, ids = make_model(insert_layer), tokens()
    blocks = model.transformer.h
    upper_in = Capture(blocks[insert_layer], "input")
    lower_out = Capture(blocks[insert_layer - 1], "output") if insert_layer else Capture(model.transformer.drop, "output")
    out = model(ids)
    h = lower_out.value
    step = model.concept(h)
    x = upper_in.value
    assert x.shape == (2, 2 * 12, 32)
    assert_close(x[:, 0::2], h, rtol=0, atol=0)
    assert_close(x[:, 1::2], step.c_BTD)
    assert out.logits.shape == (2, 12, V) and out.concept_logits.shape == (2, 12, L)


def test_concept_is_computed_from_normalised_h_as_in_the_official_code():
    model = make_model()
    h = torch.randn(2, 5, 32) * 3 + 1
    step = model.concept(h)
    # official: x, mu, std = LN(h); x = x - pre_bias; z = W x + b; c = (compress(mask*z) + pre_bias) * std + mu
    mu, std = h.mean(-1, keepdim=True), (h - h.mean(-1, keepdim=True)).std(-1, keepdim=True)
    x = (h - mu) / (std + 1e-5) - model.concept.pre_bias
    z = x @ model.concept.predictor.weight.T + model.concept.predictor.bias
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(C, dim=-1).indices, True)
    W_comp = model.concept.compress.weight.T  # [D, L], the official nn.Linear(L, D) weight
    c = ((mask * z) @ W_comp.T + model.concept.compress_bias + model.concept.pre_bias) * std + mu
    assert_close(step.z_BTL, z)
    assert_close(step.c_BTD, c)
    assert step.top_idx_BTC.shape == (2, 5, C)


def test_sparse_compress_equals_dense_official_compress_values_and_gradients():
    model = make_model()
    bottleneck = model.concept
    z = torch.randn(3, 7, L, requires_grad=True)
    norm = layernorm_unbiased(torch.randn(3, 7, 32))
    top = z.topk(C, dim=-1)
    sparse = bottleneck.compress_sparse(top.indices, top.values, norm)
    dense = bottleneck.compress_dense(z, norm)
    assert_close(sparse, dense)
    g = torch.randn_like(dense)
    grads_sparse = torch.autograd.grad((sparse * g).sum(), [z, bottleneck.compress.weight, bottleneck.pre_bias])
    grads_dense = torch.autograd.grad((dense * g).sum(), [z, bottleneck.compress.weight, bottleneck.pre_bias])
    for a, b in zip(grads_sparse, grads_dense):
        assert_close(a, b)
    unused = torch.ones(L, dtype=torch.bool)
    unused[top.indices.unique()] = False
    assert torch.count_nonzero(grads_sparse[1][unused]) == 0  # only gathered columns get gradient


@pytest.mark.parametrize("t", [0, 4, 10])
def test_changing_token_t_plus_1_changes_nothing_at_or_before_t(t):
    model, ids = make_model(), tokens()
    last = Capture(model.transformer.h[-1], "output")
    out_a = model(ids)
    hidden_a = last.value
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V
    out_b = model(changed)
    hidden_b = last.value
    assert_close(out_b.logits[:, : t + 1], out_a.logits[:, : t + 1], rtol=0, atol=1e-6)
    assert_close(out_b.concept_logits[:, : t + 1], out_a.concept_logits[:, : t + 1], rtol=0, atol=1e-6)
    # both interleaved positions of tokens <= t (h_t at 2t, c_t at 2t+1) are untouched
    assert_close(hidden_b[:, : 2 * t + 2], hidden_a[:, : 2 * t + 2], rtol=0, atol=1e-6)
    assert not torch.allclose(out_b.logits[:, t + 1], out_a.logits[:, t + 1])  # the test can see a change
    assert not torch.allclose(hidden_b[:, 2 * t + 2], hidden_a[:, 2 * t + 2])


def _perturb_last_block(model, parity: int):
    """Adds noise to the last block's output at even (token) or odd (concept) positions."""

    def hook(module, args, out):
        out = out.clone()
        out[:, parity::2] += 1.0
        return out

    return model.transformer.h[-1].register_forward_hook(hook)


def test_next_token_logits_come_from_concept_positions():
    model, ids = make_model(), tokens()
    last = Capture(model.transformer.h[-1], "output")
    base = model(ids).logits
    expected = model.lm_head(model.transformer.ln_f(last.value[:, 1::2]))
    assert_close(base, expected)
    handle = _perturb_last_block(model, parity=0)
    assert_close(model(ids).logits, base, rtol=0, atol=0)  # token positions do not feed the head
    handle.remove()
    handle = _perturb_last_block(model, parity=1)
    assert not torch.allclose(model(ids).logits, base)
    handle.remove()


def test_losses_match_official_formula_when_no_slot_is_ignored():
    model, ids, cids = make_model(), tokens(), labels()
    out = model(ids, labels=ids, concept_ids=cids)
    z = out.concept_logits
    official = sum(F.cross_entropy(z.reshape(-1, L), cids[..., i].reshape(-1)) for i in range(K)) / K
    ntp = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert_close(out.concept_loss, official)
    assert_close(out.ntp_loss, ntp)
    assert_close(out.loss, ntp + 0.1 * official)


def test_next_token_loss_follows_the_hf_gpt2_convention():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = tokens()
    lab = ids.clone()
    lab[0, 3:6] = -100
    out = gpt2(input_ids=ids, labels=lab)
    assert_close(next_token_loss(out.logits, lab), out.loss)


def test_ignored_label_slots_contribute_nothing():
    model, ids, cids = make_model(), tokens(), labels()
    ignored = torch.rand(cids.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    ignored[0, -1] = True  # a whole token without labels, like a window's last position
    with_ignore = torch.where(ignored, IGNORE, cids)
    out = model(ids, labels=ids, concept_ids=with_ignore)
    z = out.concept_logits.detach()
    per_slot = torch.stack([F.cross_entropy(z.reshape(-1, L), cids[..., i].reshape(-1), reduction="none")
                            for i in range(K)], dim=-1).view(cids.shape)
    assert_close(out.concept_loss, per_slot[~ignored].mean())
    # ignored slots carry no gradient and no value: the logits of a label-less token can be anything
    z_req = z.clone().requires_grad_(True)
    loss = concept_ce(z_req, with_ignore, IGNORE)
    loss.backward()
    assert torch.count_nonzero(z_req.grad[0, -1]) == 0
    z_moved = z.clone()
    z_moved[0, -1] += torch.randn(L) * 5
    assert_close(concept_ce(z_moved, with_ignore, IGNORE), loss.detach(), rtol=0, atol=0)


def test_all_slots_ignored_gives_zero_concept_loss_and_finite_gradients():
    model, ids = make_model(), tokens()
    model.train(False)
    out = model(ids, labels=ids, concept_ids=torch.full((2, 12, K), IGNORE))
    assert out.concept_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.count_nonzero(model.concept.predictor.bias.grad) > 0  # the NTP path still reaches the head


def test_concept_ce_handles_uint16_style_ids_above_n_latents():
    z = torch.randn(1, 2, L)
    ids = torch.tensor([[[3, IGNORE, IGNORE, IGNORE], [IGNORE] * 4]])
    assert_close(concept_ce(z, ids, IGNORE), F.cross_entropy(z[0, :1], torch.tensor([3])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_select_and_score_equals_autograd_reference(dtype, monkeypatch):
    monkeypatch.setattr(SelectAndScore, "CHUNK", 5)  # several chunks, the last one short
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 7, L, generator=g).to(dtype)
    ids = torch.randint(0, L, (3, 7, K), generator=g)
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated label counts twice, as in the official K cross-entropies
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, IGNORE, ids)
    w_val = torch.randn(3, 7, C, generator=g)  # a downstream use of the kept values (the compress)
    z_fused, z_ref = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    val, idx, loss = SelectAndScore.apply(z_fused, ids, C, IGNORE)
    top_ref = z_ref.topk(C, dim=-1)
    loss_ref = concept_ce(z_ref, ids, IGNORE)
    assert torch.equal(idx, top_ref.indices) and torch.equal(val, top_ref.values)
    assert_close(loss, loss_ref)
    (0.3 * loss + (val.float() * w_val).sum()).backward()
    (0.3 * loss_ref + (top_ref.values.float() * w_val).sum()).backward()
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else {}
    assert z_fused.grad.dtype == dtype
    assert_close(z_fused.grad, z_ref.grad, **tol)


def test_fused_loss_with_every_slot_ignored_is_zero_with_zero_gradient():
    z = torch.randn(2, 3, L, requires_grad=True)
    val, _, loss = SelectAndScore.apply(z, torch.full((2, 3, K), IGNORE), C, IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_every_parameter_gets_gradient_from_the_combined_loss():
    model, ids, cids = make_model(), tokens(), labels()
    model(ids, labels=ids, concept_ids=cids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_save_and_reload_give_identical_logits(tmp_path):
    model, ids = make_model(concept_provenance={"targets": "abc", "sae": {"n_latents": L}}), tokens()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again, CoCoMixForCausalLM)
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()  # still tied
    assert again.config.concept_provenance == {"targets": "abc", "sae": {"n_latents": L}}
    assert (again.config.insert_layer, again.config.k_concept, again.config.ignore_id) == (1, C, IGNORE)
    a, b = model(ids), again(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.concept_logits, b.concept_logits)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    cfg = CoCoMixConfig(vocab_size=V, n_positions=32, n_embd=64, n_layer=8, n_head=4, insert_layer=2,
                        n_latents=256, k_concept=8)
    model = CoCoMixForCausalLM(cfg)
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 2e-3
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 1e-3  # 0.02 / sqrt(2 * 8)
    assert abs(model.concept.compress.weight.std().item() - 0.02) < 2e-3
    assert block.attn.c_attn.bias.abs().max() == 0 and model.concept.pre_bias.abs().max() == 0
    assert model.lm_head.weight is model.transformer.wte.weight

"""``cocomix generate``: the KV caches against the uncached forward, the sampler, prompts and checkpoints."""
from __future__ import annotations

import logging

import pytest
import torch
from generate_utils import CONTEXT, C, L, V, cocomix, ntp, prompt
from torch.testing import assert_close
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.pipeline.cli import app
from cocomix.stage2_pretrain.generate import (
    FullDecoder,
    HFDecoder,
    Sampling,
    encode_prompt,
    generate,
    make_decoder,
    run_generate,
    sample_next,
)
from cocomix.stage2_pretrain.generate_config import GenerateConfig
from cocomix.stage2_pretrain.kv_cache import InterleavedDecoder
from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM

TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32: cached and uncached differ only in summation order
runner = CliRunner()


def run_both(model, sampling: Sampling, B: int = 1, n: int = 20, seed: int = 0):
    kw = dict(max_new_tokens=n, sampling=sampling, seed=seed, keep_logits=True)
    return (generate(make_decoder(model, cache=True), prompt(B), **kw), generate(make_decoder(model, cache=False), prompt(B), **kw))


@pytest.mark.parametrize("insert_layer", [0, 1, 2])
def test_cocomix_cached_logits_equal_the_uncached_forward_at_every_step(insert_layer):
    model = cocomix(insert_layer)
    cached, full = run_both(model, Sampling(temperature=0), B=2, n=25)
    assert isinstance(make_decoder(model), InterleavedDecoder)
    assert len(cached.logits) == len(full.logits) == 25
    for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
        assert_close(a, b, **TIGHT, msg=lambda m: f"step {step}: {m}")
    assert torch.equal(cached.new_ids_BT, full.new_ids_BT)  # greedy: the same text


def test_ntp_cached_logits_equal_the_uncached_forward_at_every_step():
    model = ntp()
    cached, full = run_both(model, Sampling(temperature=0), B=2, n=25)
    assert isinstance(make_decoder(model), HFDecoder)
    for a, b in zip(cached.logits, full.logits, strict=True):
        assert_close(a, b, **TIGHT)
    assert torch.equal(cached.new_ids_BT, full.new_ids_BT)


@pytest.mark.parametrize("maker", [cocomix, ntp])
def test_sampled_text_is_the_same_with_and_without_cache(maker):
    cached, full = run_both(maker(), Sampling(temperature=1.0, top_k=20, top_p=0.9), n=30)
    assert torch.equal(cached.new_ids_BT, full.new_ids_BT)


def test_prompt_fed_in_pieces_equals_one_forward_at_every_position():
    """Several new tokens after a past (the masked, non-square attention) at every block."""
    model, ids = cocomix(), prompt(B=2, T=12)
    decoder = InterleavedDecoder(model, lambda h: model.concept(h).c_BTD)
    pieces = [decoder(ids[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 9), (9, 12))]
    with torch.no_grad():
        assert_close(torch.cat(pieces, dim=1), model(ids).logits, **TIGHT)


def test_the_cache_holds_one_position_per_token_below_and_two_above():
    model = cocomix(insert_layer=1)
    decoder = make_decoder(model)
    decoder(prompt(T=5))
    decoder(prompt(T=1))
    assert decoder.cache.lengths == [6, 12, 12]


def test_sampling_is_reproducible_with_seed_and_changes_with_it():
    model = cocomix()
    kw = dict(max_new_tokens=30, sampling=Sampling(temperature=1.5, top_k=0))
    a = generate(make_decoder(model), prompt(), seed=3, **kw).new_ids_BT
    b = generate(make_decoder(model), prompt(), seed=3, **kw).new_ids_BT
    c = generate(make_decoder(model), prompt(), seed=4, **kw).new_ids_BT
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = lambda s: {int(sample_next(logits, s, gen)) for _ in range(300)}  # noqa: E731
    assert drawn(Sampling(1.0, top_k=2)) == {0, 1}
    assert drawn(Sampling(1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert drawn(Sampling(1.0, top_p=0.5)) == {0}
    assert drawn(Sampling(1.0)) == {0, 1, 2, 3}
    assert int(sample_next(logits, Sampling(temperature=0), gen)) == 0


def test_generation_stops_at_eos():
    model = cocomix()
    first = generate(make_decoder(model), prompt(), max_new_tokens=10, sampling=Sampling(temperature=0)).new_ids_BT
    eos = int(first[0, 3])
    out = generate(make_decoder(model), prompt(), max_new_tokens=10, sampling=Sampling(temperature=0), eos_id=eos).new_ids_BT
    assert out.shape[1] == int((first[0] == eos).nonzero()[0]) + 1 and int(out[0, -1]) == eos


# ----------------------------------------------------------------------------- prompts and checkpoints
class WordTokenizer:
    """One id per character: enough to count tokens."""

    def __call__(self, text):
        return {"input_ids": [ord(ch) % V for ch in text]}


def test_a_prompt_longer_than_the_context_is_cropped_from_the_left(caplog):
    with caplog.at_level(logging.WARNING, logger="cocomix"):
        ids, dropped = encode_prompt(WordTokenizer(), "abcdefghij", context=8, max_new_tokens=3)
    assert ids == [ord(ch) % V for ch in "fghij"] and dropped == 5
    assert "keeping the prompt's last 5 tokens" in caplog.text
    assert encode_prompt(WordTokenizer(), "abc", context=8, max_new_tokens=3) == ([ord(ch) % V for ch in "abc"], 0)
    with pytest.raises(ConfigError, match="--max-new-tokens 8 leaves no room"):
        encode_prompt(WordTokenizer(), "abc", context=8, max_new_tokens=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """A CoCoMix and an NTP checkpoint over the shared tokenizer, saved as training saves them."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("ckpts")
    for name, model in (("cocomix", cocomix(vocab=len(tok))), ("ntp", ntp(vocab=len(tok)))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("kind", ["cocomix", "ntp"])
def test_run_generate_greedy_is_the_same_with_and_without_cache(checkpoints, kind):
    base = dict(ckpt=str(checkpoints / kind), prompt="the model of the", max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    cached, full = run_generate(GenerateConfig(**base)), run_generate(GenerateConfig(**base, cache=False))
    assert cached.completion == full.completion and cached.new_tokens == 12
    assert cached.prompt == "the model of the" and cached.cropped == 0


def test_run_generate_crops_a_long_prompt_to_the_context(checkpoints):
    long = " ".join(["the model of the sparse concept"] * 20)
    res = run_generate(GenerateConfig(ckpt=str(checkpoints / "cocomix"), prompt=long, max_new_tokens=5, stop_at_eos=False))
    assert res.cropped > 0 and res.new_tokens == 5
    assert long.endswith(res.prompt)


def test_generate_cli_prints_prompt_and_continuation(checkpoints):
    result = runner.invoke(app, ["generate", str(checkpoints / "cocomix"), "--prompt", "the model", "--max-new-tokens", "4",
                                 "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the model") and "tokens/s" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", str(CONTEXT)], f"--max-new-tokens {CONTEXT} leaves no room"),
])
def test_bad_generate_input_is_one_line(checkpoints, args, message):
    result = runner.invoke(app, ["generate", str(checkpoints / "cocomix"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_tokenizer_comes_from_the_runs_token_store_when_the_checkpoint_has_none(tmp_path, token_store):
    from cocomix.storage.token_store import TokenStore

    store = TokenStore.open(token_store)
    model = ntp(vocab=store.vocab_size)
    model.config.cocomix_tokens = store.provenance()  # what pretrain records in an NTP checkpoint
    model.save_pretrained(tmp_path / "bare")
    res = run_generate(GenerateConfig(ckpt=str(tmp_path / "bare"), prompt="the model", max_new_tokens=3))
    assert res.prompt == "the model"
    ntp(vocab=store.vocab_size).save_pretrained(tmp_path / "nothing")
    with pytest.raises(CocomixError, match="pass --tokenizer DIR"):
        run_generate(GenerateConfig(ckpt=str(tmp_path / "nothing"), prompt="the model", max_new_tokens=3))
    res = run_generate(GenerateConfig(ckpt=str(tmp_path / "nothing"), prompt="the model", max_new_tokens=3,
                                      tokenizer=str(token_store / "tokenizer")))
    assert res.prompt == "the model"


def test_full_decoder_is_the_models_forward():
    model, ids = ntp(), prompt(T=6)
    with torch.no_grad():
        assert torch.equal(FullDecoder(model)(ids), model(ids).logits)


def test_the_pause_student_decodes_with_the_same_cache():
    """Pause-token students interleave one learned vector instead of the concept: same cache, other ``insert``."""
    from cocomix.stage2_pretrain.model_pause import PauseConfig, PauseForCausalLM

    torch.manual_seed(0)
    model = PauseForCausalLM(PauseConfig(vocab_size=V, n_positions=CONTEXT, n_embd=32, n_layer=3, n_head=4, insert_layer=1)).eval()
    assert isinstance(make_decoder(model), InterleavedDecoder)
    cached, full = run_both(model, Sampling(temperature=0), n=12)
    for x, y in zip(cached.logits, full.logits, strict=True):
        assert_close(x, y, **TIGHT)


@pytest.mark.parametrize("mix", ["add", "none"])
def test_ablations_that_do_not_interleave_decode_without_cache(mix):
    torch.manual_seed(0)
    cfg = CoCoMixConfig(vocab_size=V, n_positions=CONTEXT, n_embd=32, n_layer=3, n_head=4, insert_layer=1, n_latents=L,
                        k_concept=C, mix=mix)
    model = CoCoMixForCausalLM(cfg).eval()
    assert isinstance(make_decoder(model, cache=True), FullDecoder)
    out = generate(make_decoder(model), prompt(), max_new_tokens=4, sampling=Sampling(temperature=0))
    assert out.new_ids_BT.shape == (1, 4)

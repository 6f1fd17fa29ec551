"""``run_eval``: token-weighted perplexity over non-overlapping windows, for both model kinds."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cocomix.core.errors import ConfigError, MismatchError
from cocomix.stage2_pretrain.config import EvalConfig
from cocomix.stage2_pretrain.evaluate import run_eval


def save_model(method, folder, tokenizer_dir):
    from transformers import AutoTokenizer

    from cocomix.stage2_pretrain.presets import build_model, get_preset

    torch.manual_seed(1)
    model = build_model(method, get_preset("tiny"), vocab_size=384, n_latents=96).eval()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return model


def reference_ppl(model, split, window):
    """One window at a time, the model's own mean loss times its predictions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(split), window):
            ids = torch.from_numpy(split.read(start, start + window).astype("int64"))[None]
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            loss = out.ntp_loss if hasattr(out, "ntp_loss") else out.loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("method", ["ntp", "cocomix"])
def test_perplexity_equals_a_plain_loop(tmp_path, token_store, tokenizer_dir, method):
    from cocomix.storage.token_store import TokenStore

    model = save_model(method, tmp_path / "ckpt", tokenizer_dir)
    res = run_eval(EvalConfig(ckpt=str(tmp_path / "ckpt"), tokens=str(token_store), window=100, batch_size=3, device="cpu"))
    want, count = reference_ppl(model, TokenStore.open(token_store).split("val"), 100)
    torch.testing.assert_close(res.val_ppl, want, rtol=1e-5, atol=0)
    assert res.tokens == count and res.windows == math.ceil(684 / 100)
    saved = json.loads((tmp_path / "ckpt" / "eval.json").read_text())
    assert saved["val_ppl"] == res.val_ppl and saved["loss"] == res.loss and saved["tokens"] == count


def test_default_window_is_the_model_context(tmp_path, token_store, tokenizer_dir):
    save_model("ntp", tmp_path / "ckpt", tokenizer_dir)
    res = run_eval(EvalConfig(ckpt=str(tmp_path / "ckpt"), tokens=str(token_store), device="cpu"))
    assert res.window == 128 and res.windows == 6


def test_window_longer_than_the_context_names_the_flag(tmp_path, token_store, tokenizer_dir):
    save_model("ntp", tmp_path / "ckpt", tokenizer_dir)
    with pytest.raises(ConfigError, match="--window"):
        run_eval(EvalConfig(ckpt=str(tmp_path / "ckpt"), tokens=str(token_store), window=1024, device="cpu"))


def test_other_tokenizer_is_refused(tmp_path, token_store, tokenizer_dir):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    save_model("ntp", tmp_path / "ckpt", tokenizer_dir)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["something else entirely"] * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(MismatchError, match="--tokens"):
        run_eval(EvalConfig(ckpt=str(tmp_path / "ckpt"), tokens=str(token_store), device="cpu"))


def test_another_split_keeps_the_val_result_and_loads_quietly(tmp_path, token_store, tokenizer_dir):
    import subprocess
    import sys

    save_model("cocomix", tmp_path / "ckpt", tokenizer_dir)
    common = dict(ckpt=str(tmp_path / "ckpt"), tokens=str(token_store), window=100, device="cpu")
    cli = subprocess.run([sys.executable, "-m", "cocomix.pipeline.cli", "eval", str(tmp_path / "ckpt"), "--tokens",
                          str(token_store), "--window", "100", "--max-windows", "2"], capture_output=True, text=True)
    assert cli.returncode == 0 and "instantiate a model of type" not in cli.stderr + cli.stdout, cli.stderr
    val = run_eval(EvalConfig(**common))
    train = run_eval(EvalConfig(**common, split="train", max_windows=3))
    assert json.loads((tmp_path / "ckpt" / "eval.json").read_text())["val_ppl"] == val.val_ppl
    saved = json.loads((tmp_path / "ckpt" / "eval-train.json").read_text())
    assert saved["split"] == "train" and saved["val_ppl"] == train.val_ppl and saved["windows"] == 3
